"""sidecar: a reverse-proxy authentication sidecar configured by YAML route policies."""

__version__ = "0.1.0"
