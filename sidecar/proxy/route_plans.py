"""A configuration compiled for serving: routes indexed, authenticators built, strip plans and transports
ready. Built once at load (and on reload); a request takes one snapshot and keeps it to the end."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sidecar.authn.base import AuthnContext
from sidecar.authn.registry import REGISTRY
from sidecar.proxy.cors import Cors
from sidecar.proxy.routing import CompiledRoute, RouteTable
from sidecar.proxy.transports.base import Upstream
from sidecar.proxy.upstream_request import IdentityHeaders, StripPlan

if TYPE_CHECKING:
    from sidecar.authn.base import Authenticator
    from sidecar.config.clients import ClientConfig
    from sidecar.config.model import LoadedConfig, RouteConfig, TimeoutsConfig, UpstreamTlsConfig, WebSocketConfig
    from sidecar.proxy.transports.base import Transport


@dataclass(frozen=True, slots=True)
class RoutePlan:
    route: CompiledRoute
    config: RouteConfig
    authenticators: tuple[Authenticator, ...]
    strip: StripPlan
    needs_body: bool
    bearer: bool
    transport: Transport
    base_path: str
    report_only: bool = False  # route `mode: report_only`: refusals are audited as would_deny, not answered
    cors: Cors | None = None
    websocket: WebSocketConfig | None = None  # None: WebSocket upgrades refused on this route
    upstream: Upstream | None = None  # where a WebSocket tunnel connects (its own connection, not the pool's)
    upstream_tls: UpstreamTlsConfig | None = None


class PolicyContext(AuthnContext, Protocol):
    """What compiling a policy needs: a transport per upstream (the runtime's pools, sidecar/runtime.py; nothing
    connected for `sidecar explain`). It is handed on to the authenticators' builders too."""

    def transport_for(self, upstream_url: str, timeouts: TimeoutsConfig | None = None,
                      tls: UpstreamTlsConfig | None = None) -> Transport: ...


class Policy:
    def __init__(self, loaded: LoadedConfig, services: PolicyContext) -> None:
        config = loaded.config
        self.loaded = loaded
        self.config = config
        self.authenticators: dict[str, Authenticator] = {
            name: REGISTRY[cfg.type].build(name, cfg, services) for name, cfg in loaded.authenticators.items()
        }
        self.clients: dict[str, ClientConfig] = {client.id: client for client in config.clients}
        # An authenticator that maps a credential to a configured client (client_token, client_jwt) decides from
        # the `clients` section too: its verdict cache key covers that section, so after a reload that removes or
        # changes a client or token, no verdict made under the old section is served (local or shared layer).
        clients_digest = _clients_digest(config.clients)
        for auth in self.authenticators.values():
            if auth.client_bound:
                auth.fingerprint = hashlib.sha256(auth.fingerprint + clients_digest).digest()
        self.table = RouteTable(config.routes)
        self.identity_headers = IdentityHeaders(config.identity.header_prefix)
        self.trusted_proxies = tuple(config.trusted_proxies)
        self.plans: list[RoutePlan] = []
        for compiled in self.table.routes:
            route = compiled.config
            auths = tuple(self.authenticators[name] for name in route.auth)
            upstream = route.upstream or config.upstream
            # TLS settings matter only to an https upstream; an http one shares its transport whatever they say.
            tls = (route.upstream_tls or config.upstream_tls) if upstream.startswith("https:") else None
            transport = services.transport_for(upstream, config.timeouts, tls)
            self.plans.append(RoutePlan(
                route=compiled, config=route, authenticators=auths,
                strip=StripPlan.from_sources(s for a in auths for s in a.sources),
                needs_body=any(a.needs_body for a in auths),
                bearer=any(a.bearer for a in auths),
                transport=transport,
                base_path=transport.upstream.base_path,  # type: ignore[attr-defined]
                report_only=route.mode == "report_only",
                cors=Cors.of(route),
                websocket=config.websocket if route.websocket is True else route.websocket or None,
                upstream=Upstream.parse(upstream), upstream_tls=tls,
            ))

    def match(self, method: str, host: str, path: str) -> RoutePlan | None:
        route = self.table.match(method, host, path)
        return None if route is None else self.plans[route.index]


def _clients_digest(clients: list[ClientConfig]) -> bytes:
    dump = sorted((client.model_dump(mode="json") for client in clients), key=lambda c: str(c["id"]))
    return hashlib.sha256(json.dumps(dump, sort_keys=True, default=str).encode()).digest()
