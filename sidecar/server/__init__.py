"""Serving: the process runner and supervisor, the HTTP protocol, the ASGI apps."""
