"""Authorisation after authentication: the route's `require` block and the client's own limits
(`routes`, `allowed_ips`). Run on every request, cached identity or not (SPEC §10)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from sidecar.errors import Forbidden
from sidecar.ip_addresses import ip_in

if TYPE_CHECKING:
    from sidecar.authn.base import Identity
    from sidecar.config.clients import ClientConfig
    from sidecar.config.model import ClientCertRequire, RouteConfig
    from sidecar.proxy.client_cert import ClientCert


def authorize(route: RouteConfig, identity: Identity, client_ip: str, clients: Mapping[str, ClientConfig],
              client_bound: bool = False, client_cert: ClientCert | None = None) -> None:
    """`client_bound`: the identity's client was established from the `clients` section (client_token,
    client_jwt), so a client that is no longer configured fails here rather than skipping its limits.
    `client_cert`: the verified client certificate of the TLS connection, if any."""
    require = route.require
    if require.client_cert is not None:
        _check_client_cert(require.client_cert, client_cert)
    if require.scopes and not identity.scopes.issuperset(require.scopes):
        raise Forbidden("the credential lacks a scope this route requires", reason="insufficient_scope")
    if require.clients and identity.client not in require.clients:
        raise Forbidden("this client may not call this route", reason="route_not_allowed")
    if require.ips and not ip_in(client_ip, require.ips):
        raise Forbidden("requests from this address are not allowed here", reason="ip_not_allowed")
    client = clients.get(identity.client) if identity.client else None
    if client is None and client_bound:
        raise Forbidden("the credential's client is no longer configured", reason="route_not_allowed")
    if client is not None:
        if client.routes is not None and route.id not in client.routes:
            raise Forbidden("this client may not call this route", reason="route_not_allowed")
        if client.allowed_ips is not None and not ip_in(client_ip, client.allowed_ips):
            raise Forbidden("requests from this address are not allowed for this client", reason="ip_not_allowed")


def _check_client_cert(require: ClientCertRequire, cert: ClientCert | None) -> None:
    """A verified client certificate, and when lists are given one whose subject or fingerprint is listed."""
    if cert is None:
        raise Forbidden("this route requires a client certificate", reason="client_cert_required")
    if (require.subjects or require.fingerprints) and cert.subject not in require.subjects \
            and cert.sha256 not in require.fingerprints:
        raise Forbidden("this client certificate may not call this route", reason="client_cert_not_allowed")
