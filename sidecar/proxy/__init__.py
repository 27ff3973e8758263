"""The data plane: one request from route match to the upstream and back."""
