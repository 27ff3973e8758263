"""Shared state in Redis (or in memory): the store, client tokens, client public keys."""
