"""The sidecar's own endpoints: OAuth2 token endpoint, JWKS, key endpoint (REST and SOAP)."""
