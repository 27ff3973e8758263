"""Forward transports: a small base interface, one file per transport, a registry."""
