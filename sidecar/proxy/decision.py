"""Decision mode (SPEC §11): a data plane (nginx, Traefik, Caddy, Envoy) carries the bytes and asks the sidecar
whether a request may pass. The answer is decided by the gateway's own `decide` (route match on the normalised
path with the same 400s, authenticate through the verdict cache, `require`), refused by the gateway's own
`refused` (same status, JSON body, `WWW-Authenticate`, `auth.refused` event) and recorded by its `record` (audit
line and metrics with `mode="decision"`). Only the framing differs, per data plane:

- `/nginx` (nginx `auth_request`, ingress-nginx `auth-url`): the original request from `X-Original-Method`,
  `X-Original-URI`, `X-Original-Host` (else `Host`); without X-Original-URI, from ingress-nginx's
  `X-Original-URL`. nginx understands only 2xx, 401 and 403 from an auth subrequest, so every refusal is a 401
  or a 403, with the refusal's `error` code in `X-Auth-Reason` and proxy mode's status in `X-Auth-Status`.
- `/traefik` (Traefik ForwardAuth, Caddy `forward_auth`): the original request from `X-Forwarded-Method`,
  `-Proto`, `-Host`, `-Uri`; refusals exactly as in proxy mode (these proxies pass any status through).
- `/envoy/<original path>` (Envoy HTTP ext_authz, `path_prefix: /envoy`): the request's own method, path, query
  and headers (and body with `with_request_body`); refusals as in proxy mode; on allow
  `x-envoy-auth-headers-to-remove` names every credential header and every client-sent identity header.

On allow: 200, the identity headers (and the signed identity token when configured), `X-Request-Id`, and
`X-Auth-Upstream-Uri`: the normalised path that was authorised with the credential query parameters removed.
The client address is `X-Forwarded-For` (else `X-Real-IP`) walked per `trusted_proxies` from the data plane's
own address, as in proxy mode: from a peer that is not trusted, no header changes it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from sidecar.errors import BadRequest, NotFound, Refusal
from sidecar.proxy.gateway import ClientDisconnected, Exchange, event_data, scan_headers
from sidecar.proxy.upstream_request import add_identity, client_identity_headers, strip_cookies, strip_query

if TYPE_CHECKING:
    from sidecar.authn.base import Identity
    from sidecar.config.model import LoadedConfig
    from sidecar.proxy.gateway import Gateway
    from sidecar.proxy.request_view import Headers, RequestView
    from sidecar.proxy.route_plans import Policy, RoutePlan

Scope = dict[str, Any]

NGINX, TRAEFIK, ENVOY = "nginx", "traefik", "envoy"
ENVOY_PREFIX = "/envoy"
UPSTREAM_URI = b"x-auth-upstream-uri"
UPSTREAM_PATH = b"x-auth-upstream-path"
UPSTREAM_QUERY = b"x-auth-upstream-query"
UPSTREAM_COOKIE = b"x-auth-upstream-cookie"
AUTH_REASON = b"x-auth-reason"
AUTH_STATUS = b"x-auth-status"
ENVOY_REMOVE = b"x-envoy-auth-headers-to-remove"

# What each data plane uses to describe the original request: (method, uri, host, proto). Removed from the headers
# the authenticators see, so a credential source can never be one of them.
_ORIGINAL = {
    NGINX: (b"x-original-method", b"x-original-uri", b"x-original-host", b"x-forwarded-proto"),
    TRAEFIK: (b"x-forwarded-method", b"x-forwarded-uri", b"x-forwarded-host", b"x-forwarded-proto"),
}
# Framing of the ask itself: never the original request's (the data planes send no body on these asks).
_FRAMING = frozenset({b"host", b"content-length", b"transfer-encoding", b"x-original-url"})


def original_scope(kind: str, scope: Scope) -> Scope:
    """The ASGI scope of the request the data plane is asking about, for `Gateway.decide` (400 when it cannot be
    read). The peer stays the data plane's address: `trusted_proxies` decides whether its X-Forwarded-For counts."""
    headers: Headers = scope["headers"]
    if kind == ENVOY:
        raw = scope.get("raw_path") or scope["path"].encode("utf-8")
        path = raw[len(ENVOY_PREFIX):] or b"/"
        return {**scope, "raw_path": path, "path": unquote(path.decode("latin-1"))}
    method_name, uri_name, host_name, proto_name = _ORIGINAL[kind]
    method = uri = host = proto = None
    forwarded_for = False
    real_ip = None
    kept: Headers = []
    own_host = full_url = None
    seen: set[bytes] = set()
    for key, value in headers:
        if key in _ORIGINAL[kind] or key == b"x-original-url":
            if key in seen:  # two descriptions of one request: which one would the data plane have forwarded?
                raise BadRequest(f"the {key.decode()} header is repeated")
            seen.add(key)
        if key == method_name:
            method = value
        elif key == uri_name:
            uri = value
        elif key == host_name:
            host = value
        elif key == b"host":
            own_host = value
        elif key == b"x-original-url" and kind == NGINX:
            full_url = value  # ingress-nginx sends `$scheme://$http_host$request_uri` here, and no X-Original-URI
        elif key == proto_name:
            proto = value
            kept.append((key, value))
        else:
            if key == b"x-forwarded-for":
                forwarded_for = True
            elif key == b"x-real-ip":
                real_ip = value
            if key not in _FRAMING and key not in _ORIGINAL[kind]:
                kept.append((key, value))
    if uri is None and full_url is not None:
        _, _, rest = full_url.partition(b"://")
        authority, slash, target = rest.partition(b"/")
        uri = slash + target
        host = host if host is not None else authority
    if uri is None or not uri.startswith(b"/"):
        raise BadRequest(f"the {uri_name.decode()} header must carry the original request target")
    if method is None or not method.isalpha():
        raise BadRequest(f"the {method_name.decode()} header must carry the original request method")
    host = host if host is not None else own_host
    if host is not None:
        kept.append((b"host", host))
    if real_ip is not None and not forwarded_for:
        kept.append((b"x-forwarded-for", real_ip))  # walked per trusted_proxies like X-Forwarded-For
    path, _, query = uri.partition(b"?")
    path = path.split(b"#", 1)[0]
    return {
        "type": "http", "http_version": "1.1", "method": method.decode("ascii").upper(), "raw_path": path,
        "path": unquote(path.decode("latin-1")), "query_string": query, "headers": kept,
        "client": scope.get("client"), "scheme": "https" if proto == b"https" else "http",
    }


def upstream_target(plan: RoutePlan, request: RequestView) -> Headers:
    """The URI the data plane should forward: the authorised (normalised) path, credential parameters removed; whole
    (nginx: `proxy_pass http://backend$auth_uri`) and in parts (Caddy's `rewrite` splits its template at `?`)."""
    query = strip_query(request.query_string, plan.strip.query)
    path = request.path.encode("ascii")
    return [(UPSTREAM_URI, path + b"?" + query if query else path), (UPSTREAM_PATH, path), (UPSTREAM_QUERY, query)]


def stripped_cookie(plan: RoutePlan, request: RequestView) -> bytes | None:
    """The Cookie header without the route's credential cookies (b"" when nothing is left); None when unchanged."""
    if not plan.strip.cookies:
        return None
    cookie = request.header(b"cookie")
    if cookie is None:
        return None
    return strip_cookies(cookie.encode("latin-1"), plan.strip.cookies)


def removals(plan: RoutePlan, request: RequestView, policy: Policy) -> list[bytes]:
    """Headers the data plane must remove before forwarding: every credential header the route's authenticators
    read, and every client-sent header in the identity namespace (the sidecar's values are set after removal)."""
    names = sorted(plan.strip.headers)
    for key in client_identity_headers(request.headers, policy.identity_headers):
        if key not in names:
            names.append(key)
    return names


class DecisionApp:
    """The decision listener's ASGI application (`sidecar run --decision-port P`)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        path = scope["path"]
        kind = NGINX if path == "/nginx" else TRAEFIK if path == "/traefik" else (
            ENVOY if path == ENVOY_PREFIX or path.startswith(ENVOY_PREFIX + "/") else None)
        gateway = self.gateway
        policy: Policy = gateway.services.policy
        answer = _nginx_send(send) if kind == NGINX else send
        try:
            if kind is None:
                raise NotFound("the decision port serves /nginx, /traefik and /envoy/<path>")
            original = original_scope(kind, scope)
        except Refusal as refusal:
            exchange = Exchange(scope["method"], scan_headers(scope["headers"]), mode="decision")
            await gateway.refused(refusal, exchange, answer)
            gateway.record(exchange)
            return
        asked = await self.ask(original, receive, answer)
        if asked is None:
            return
        exchange, plan, request, identity = asked
        headers: Headers = [(b"content-length", b"0"), (b"cache-control", b"no-store"),
                            *self.identity(request, identity)]
        if kind == ENVOY:
            remove = removals(plan, request, policy)
            cookie = stripped_cookie(plan, request)
            if cookie:
                headers.append((b"cookie", cookie))
            elif cookie is not None:
                remove.append(b"cookie")
            if remove:
                headers.append((ENVOY_REMOVE, b",".join(remove)))
        else:
            headers.extend(upstream_target(plan, request))
            if kind == NGINX:  # the Cookie to forward (`proxy_set_header Cookie $auth_cookie`): credentials removed
                cookie = stripped_cookie(plan, request)
                if cookie is None:
                    original_cookie = request.header(b"cookie")
                    cookie = original_cookie.encode("latin-1") if original_cookie else None
                if cookie:
                    headers.append((UPSTREAM_COOKIE, cookie))
            if kind == TRAEFIK and (identity is None or not identity.client):
                # Always named, empty when there is none: Caddy before 2.10 copies a header the answer lacks as its
                # literal placeholder text, and Traefik removes the client's copy of every listed header either way.
                headers.append((policy.identity_headers.client, b""))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        await self.allowed(exchange, plan, identity)

    async def ask(self, original: Scope, receive: Any,
                  answer: Any) -> tuple[Exchange, RoutePlan, RequestView, Identity | None] | None:
        """The gateway's decision on the original request; a refusal is answered through `answer` (ASGI messages, as
        in proxy mode), audited and counted here, and None returned."""
        gateway = self.gateway
        exchange = Exchange(original["method"], scan_headers(original["headers"]), mode="decision")
        try:
            plan, request, _auth, identity = await gateway.decide(gateway.services.policy, original, receive, exchange)
        except Refusal as refusal:
            await gateway.refused(refusal, exchange, answer)
            gateway.record(exchange)
            return None
        except ClientDisconnected:
            exchange.finish("abandoned", "client_disconnected", 499)
            gateway.record(exchange)
            return None
        return exchange, plan, request, identity

    def identity(self, request: RequestView, identity: Identity | None) -> Headers:
        """X-Request-Id and the identity headers (and signed identity token) proxy mode would send upstream; none
        for a CORS preflight or a report-only route's refused credential (proxy mode forwards those without)."""
        headers: Headers = [(b"x-request-id", request.request_id.encode())]
        services = self.gateway.services
        if identity is not None:
            add_identity(headers, services.policy.identity_headers, identity, services.identity_token(identity))
        return headers

    async def allowed(self, exchange: Exchange, plan: RoutePlan, identity: Identity | None) -> None:
        exchange.finish(exchange.decision or "allow", exchange.reason or "ok", 200)  # or would_deny (report-only)
        if identity is not None and plan.config.emit:
            await self.emit(plan, identity)
        self.gateway.record(exchange)

    async def emit(self, plan: RoutePlan, identity: Identity) -> None:
        """A route's `emit` events fire on an allowed decision: the upstream's status and reply are the data plane's,
        unseen here, so every `emit` whose `when` is `2xx` or `any` fires, with no reply data."""
        emits = [e for e in plan.config.emit if e.when in ("2xx", "any")]
        if emits:
            data = event_data(b"", 0, 0, identity, plan.route.id)
            data["mode"] = "decision"
            for emit in emits:
                await self.gateway.services.events.emit(emit.event, data)


def _nginx_send(send: Any) -> Any:
    """A refusal in nginx's terms: nginx turns anything but 2xx, 401 and 403 from an auth subrequest into a 500, so
    a 401 stays a 401 (and so does the login redirect, a 302, which keeps its Location) and everything else becomes a
    403; `X-Auth-Status` carries the status proxy mode would have answered and `X-Auth-Reason` the refusal's `error`
    code (from its JSON body). The gateway sends a refusal as one start and one body message."""
    held: list[dict[str, Any]] = []

    async def nginx_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            held.append(message)
            return
        start = held.pop()
        status = start["status"]
        headers = [*start["headers"], (AUTH_STATUS, str(status).encode()),
                   (AUTH_REASON, _reason(message.get("body", b"")).encode())]
        await send({**start, "status": 401 if status in (401, 302) else 403, "headers": headers})
        await send(message)

    return nginx_send


def _reason(body: bytes) -> str:
    try:
        error = json.loads(body).get("error") if body else None
    except (ValueError, AttributeError):
        error = None
    return error if isinstance(error, str) and error.isascii() and error.isprintable() else "login_required"


def body_warnings(loaded: LoadedConfig) -> list[str]:
    """`sidecar check`: routes whose authenticators read the request body. In decision mode only Envoy can send the
    body (`with_request_body`); behind nginx, Traefik or Caddy such a route finds no credential and is refused."""
    from sidecar.proxy.explain import Offline
    from sidecar.proxy.route_plans import Policy

    offline = Offline(loaded)
    policy = offline.compiled = Policy(loaded, offline)
    return [f"route {plan.route.id!r}: its authenticators read the request body, which decision mode gets only from "
            "Envoy with with_request_body (nginx, Traefik and Caddy send none: there the route is always refused)"
            for plan in policy.plans if plan.needs_body]
