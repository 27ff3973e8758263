"""Authenticators: the protocol (base.py), one file per `type:` (jwt.py, client_token.py, ...), their helpers,
and the registry by type name (registry.py)."""
