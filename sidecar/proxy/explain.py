"""`sidecar explain`: how one request would be handled, without sending anything — which routes were tried
and why they did not match, which authenticator would read which credential, and the exact request the
upstream would receive (identity headers shown as they would be set on success)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from sidecar.authn.base import Identity
from sidecar.authn.jwks import JwksKeys
from sidecar.config.model import LoadedConfig, TimeoutsConfig, UpstreamTlsConfig
from sidecar.errors import Refusal
from sidecar.outbound.guard import ServiceClient
from sidecar.proxy.request_view import RequestView, client_address, is_trusted_peer
from sidecar.proxy.route_plans import Policy
from sidecar.proxy.routing import normalise_path
from sidecar.proxy.transports.base import Body, Headers, Upstream, UpstreamResponse
from sidecar.proxy.upstream_request import build_headers, strip_query, target
from sidecar.state.client_public_keys import ClientKeys
from sidecar.state.client_token_store import ClientTokens
from sidecar.state.store import MemoryStore


class OfflineTransport:
    """A transport that only says where it would send: `sidecar explain` connects to nothing."""

    def __init__(self, url: str) -> None:
        self.upstream = Upstream.parse(url)

    async def send(self, method: str, target: bytes, headers: Headers, body: Body) -> UpstreamResponse:
        raise RuntimeError("sidecar explain sends nothing")

    async def aclose(self) -> None:
        return None


class Offline:
    """The runtime `sidecar explain` compiles a policy with (`PolicyContext`): in-memory state, transports that
    connect to nothing, an HTTP client that is never used. Nothing is connected and nothing is sent."""

    def __init__(self, loaded: LoadedConfig) -> None:
        self.config = loaded.config
        self.store = MemoryStore()
        self.client_tokens = ClientTokens(self.store, loaded.config.clients)
        self.client_keys = ClientKeys(self.store)
        self.http = ServiceClient()  # opens nothing until a request is sent, and explain sends none
        self.compiled: Policy | None = None  # set once compiled: authenticators read it only when verifying

    @property
    def policy(self) -> Policy:
        assert self.compiled is not None, "the policy is read only after it is compiled"
        return self.compiled

    def transport_for(self, upstream_url: str, timeouts: TimeoutsConfig | None = None,
                      tls: UpstreamTlsConfig | None = None) -> OfflineTransport:
        return OfflineTransport(upstream_url)

    def issuer_public_keys(self) -> list[tuple[str, Any]]:
        return []

    def jwks_for(self, url: str) -> JwksKeys:
        return JwksKeys(url, self.http)  # never fetched: explain verifies nothing


def explain(loaded: LoadedConfig, method: str, url: str, header_lines: list[str], peer: str = "127.0.0.1") -> str:
    offline = Offline(loaded)
    policy = offline.compiled = Policy(loaded, offline)
    parts = urlsplit(url)
    method = method.upper()
    headers = [(b"host", (parts.netloc or "localhost").encode())]
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower().encode("latin-1"), value.strip().encode("latin-1")))
    out = [f"request: {method} {url}"]
    try:
        path = normalise_path((parts.path or "/").encode())
    except Refusal as refusal:
        return "\n".join([*out, f"refused: {refusal.status} {refusal.reason}: {refusal.description}"])
    host = parts.hostname or ""
    out.append(f"normalised path: {path}")
    plan = policy.match(method, host, path)
    for compiled in policy.table.routes:
        if plan is not None and compiled.index >= plan.route.index:
            break
        out.append(f"  route {compiled.id}: no match ({compiled.why_not(method, host, path)})")
    if plan is None:
        return "\n".join([*out, "no route matches: 404 no_route (nothing is forwarded)"])
    out.append(f"  route {plan.route.id}: MATCH")
    request = RequestView(method, path, (parts.query or "").encode(), headers, host, parts.scheme or "http", peer,
                          client_address(peer, [], policy.trusted_proxies), "<request-id>")
    chosen = None
    for auth in plan.authenticators:
        sources = ", ".join(str(s) for s in auth.sources) or "(nothing: always accepts)"
        try:
            credential = auth.credential(request) if not auth.needs_body else None
        except Refusal as refusal:
            out.append(f"authenticator {auth.name}: refused {refusal.status} {refusal.reason}")
            return "\n".join(out)
        found = "credential found" if credential is not None else "no credential"
        if auth.needs_body:
            found = "reads the body (not examined here)"
        out.append(f"authenticator {auth.name} ({type(auth).__name__}) reads {sources}: {found}")
        if credential is not None and chosen is None:
            chosen = auth
    if chosen is None:
        out.append("no credential for any authenticator: 401 missing_credentials (unless a body credential is sent)")
        chosen = plan.authenticators[0]
    else:
        out.append(f"{chosen.name} would decide (accept, or refuse with 401)")
    require = plan.config.require
    if require.scopes or require.clients or require.ips:
        out.append(f"then require: {require.model_dump(mode='json', exclude_defaults=True)}")
    identity = Identity(subject="<subject>", authenticator=chosen.name, client="<client>",
                        scopes=frozenset({"<scopes>"}))
    forwarded = build_headers(request, identity, plan.strip, policy.identity_headers,
                              trusted_peer=is_trusted_peer(peer, policy.trusted_proxies))
    upstream = plan.config.upstream or loaded.config.upstream
    query = strip_query(request.query_string, plan.strip.query)
    out.append(f"upstream request ({upstream}):")
    out.append(f"  {method} {target(plan.base_path, path, query).decode('latin-1')} HTTP/1.1")
    out.extend(f"  {k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in forwarded)
    return "\n".join(out)
