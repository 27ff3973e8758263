"""Outbound safety: which addresses the sidecar may call, and connections pinned to them."""
