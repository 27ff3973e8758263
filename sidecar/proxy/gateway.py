"""The flow of one proxied request: route → request view → authenticate → authorise → forward → record.

An `Exchange` carries one request's audit fields and whether its reply has started. Every refusal is a `Refusal`
(sidecar/errors.py) raised on the way and answered here, with its audit line and metrics."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sidecar.errors import (
    BadRequest,
    Forbidden,
    HeadersTooLarge,
    MissingCredentials,
    NoRoute,
    PayloadTooLarge,
    Refusal,
    Unauthenticated,
)
from sidecar.ops import tracing
from sidecar.proxy.authorization import authorize
from sidecar.proxy.client_cert import client_cert
from sidecar.proxy.cors import is_preflight
from sidecar.proxy.request_view import RequestView, client_address, is_trusted_peer
from sidecar.proxy.routing import normalise_path
from sidecar.proxy.upstream_request import build_headers, strip_body, strip_query, target
from sidecar.proxy.verdict_cache import CACHE_RESULT
from sidecar.proxy.websocket import SCOPE_KEY as WEBSOCKET

if TYPE_CHECKING:
    from sidecar.authn.base import Authenticator, Identity
    from sidecar.proxy.context import GatewayContext
    from sidecar.proxy.route_plans import Policy, RoutePlan
    from sidecar.proxy.websocket import ClientConnection

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 128
USER_AGENT_MAX = 256


class ClientDisconnected(Exception):
    pass


class Exchange:
    """One request on its way through the gateway: what its audit line records, and whether its reply has started
    (after which a refusal can only be audited, no longer answered)."""

    __slots__ = ("auth_name", "decision", "detail", "identity", "method", "mode", "path", "plan", "preflight",
                 "reason", "request", "responded", "response_bytes", "seen", "started", "status", "trace",
                 "upstream_seconds")

    def __init__(self, method: str, seen: SeenHeaders, mode: str = "proxy") -> None:
        self.started = time.perf_counter()
        self.method = method
        self.mode = mode  # "proxy", or "decision" when a data plane asked (sidecar/proxy/decision.py)
        self.seen = seen
        self.path: str | None = None
        self.plan: RoutePlan | None = None
        self.request: RequestView | None = None
        self.auth_name: str | None = None
        self.identity: Identity | None = None
        self.responded = False
        self.preflight = False
        self.upstream_seconds: float | None = None
        self.decision = self.reason = self.detail = ""
        self.status = 0
        self.response_bytes = 0
        self.trace: tracing.RequestTrace | None = None
        CACHE_RESULT.set(None)  # set by the verdict cache if this request's credential goes through it

    def finish(self, decision: str, reason: str, status: int) -> None:
        self.decision, self.reason, self.status = decision, reason, status

    @property
    def route_id(self) -> str | None:
        return self.plan.route.id if self.plan is not None else None

    def audit_line(self, route: str | None, total: float) -> dict[str, Any]:
        line: dict[str, Any] = {"request_id": self.seen.request_id, "mode": self.mode, "method": self.method,
                                "route": route, "user_agent": self.seen.user_agent}
        if self.trace is not None:
            line["trace_id"] = self.trace.trace_id
        if self.path is not None:
            line["path"] = self.path
        cache = CACHE_RESULT.get()
        if cache is not None:
            line["cache"] = cache
        if self.request is not None:
            line["client_ip"] = self.request.client_ip
        if self.identity is not None:
            line["authenticator"] = self.auth_name
            line["subject"] = self.identity.subject
            line["client"] = self.identity.client
        line["decision"], line["reason"], line["status"] = self.decision, self.reason, self.status
        line["response_bytes"] = self.response_bytes
        if self.upstream_seconds is not None:
            line["upstream_ms"] = round(self.upstream_seconds * 1000, 2)
        if self.detail:
            line["detail"] = self.detail
        line["total_ms"] = round(total * 1000, 2)
        return line


class Gateway:
    def __init__(self, services: GatewayContext) -> None:
        self.services = services

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        policy: Policy = self.services.policy
        exchange = Exchange(scope["method"], scan_headers(scope["headers"]))
        exchange.trace = tracing.start_request(scope)  # None when tracing is off
        try:
            plan, request, auth, identity = await self.decide(policy, scope, receive, exchange)
            websocket = scope.get(WEBSOCKET)  # a WebSocket handshake (server/http_protocol.py)
            if exchange.preflight:  # a CORS preflight on a route with `cors`: answered here, never forwarded
                await self.answer_preflight(plan, request, send, exchange)
            elif websocket is None:
                await self.forward(policy, plan, request, auth, identity, receive, send, exchange)
            else:
                await self.tunnel(policy, plan, request, identity, websocket, send, exchange)
        except Refusal as refusal:
            await self.refused(refusal, exchange, send)
        except ClientDisconnected:
            exchange.finish("abandoned", "client_disconnected", 499)
        except asyncio.CancelledError:  # --grace ran out: the server protocol answers 503 (or closes); audit it too
            exchange.finish("abandoned", "shutting_down", 499 if exchange.responded else 503)
            self.record(exchange)
            raise
        self.record(exchange)

    async def decide(self, policy: Policy, scope: dict[str, Any], receive: Any,
                     exchange: Exchange) -> tuple[RoutePlan, RequestView, Authenticator | None, Identity | None]:
        """Route, read the body when an authenticator needs it, authenticate and authorise: the decision proxy mode and
        decision mode (sidecar/proxy/decision.py) share. Raises a `Refusal` for every way a request is turned away.
        No identity comes back for a CORS preflight (`exchange.preflight`: it carries no credential) and for a
        refusal on a report-only route (`exchange.decision` is then `would_deny`)."""
        plan, request = self.route(policy, scope, exchange)
        if exchange.preflight:
            return plan, request, None, None
        if plan.needs_body:
            request.body = await read_body(receive, plan.config.max_body, exchange.seen.content_length)
        auth, identity = await self.admit(policy, plan, request, exchange)
        if plan.config.rate_limit is not None:
            await self.services.rate_limits.check(plan.route.id, plan.config.rate_limit, identity, request.client_ip)
        return plan, request, auth, identity

    def route(self, policy: Policy, scope: dict[str, Any], exchange: Exchange) -> tuple[RoutePlan, RequestView]:
        """The request's route and its view, once the head is known to be well-formed (400 / 404 / 431 if not)."""
        seen = exchange.seen
        if seen.bad_framing:
            raise BadRequest("only Transfer-Encoding: chunked is accepted (RFC 9112 §6.1)")
        if seen.too_large:
            raise HeadersTooLarge(f"at most {MAX_HEADERS} header fields and {MAX_HEADER_BYTES} bytes are accepted")
        path = exchange.path = normalise(scope)
        if seen.hosts != 1 and (seen.hosts > 1 or scope.get("http_version") == "1.1"):
            raise BadRequest("an HTTP/1.1 request carries exactly one Host header (RFC 9112 §3.2)")
        if seen.bad_host:
            raise BadRequest("the Host header is not a host name or address with an optional port (RFC 9110 §7.2)")
        # A CORS preflight is routed by the method it asks about; a route without `cors` sees it as today.
        wanted = is_preflight(scope["method"], scope["headers"]) if scope["method"] == "OPTIONS" else None
        plan = policy.match(wanted, seen.host, path) if wanted else None
        if plan is not None and plan.cors is not None:
            exchange.preflight = True
        else:
            plan = policy.match(scope["method"], seen.host, path)
        if plan is None:
            raise NoRoute("no route matches this request")
        exchange.plan = plan
        client = scope.get("client")
        peer = client[0] if client else "0.0.0.0"
        client_ip = client_address(peer, seen.forwarded_for, policy.trusted_proxies) if policy.trusted_proxies else peer
        request = exchange.request = RequestView(
            scope["method"], path, scope.get("query_string", b""), scope["headers"], seen.authority,
            scope.get("scheme", "http"), peer, client_ip, seen.request_id)
        request.client_cert = client_cert(scope)
        return plan, request

    async def answer_preflight(self, plan: RoutePlan, request: RequestView, send: Any, exchange: Exchange) -> None:
        """204 with the route's CORS headers (none for an origin or method it does not allow); no authentication:
        browsers send preflights without credentials (Fetch §3.2.2)."""
        headers = plan.cors.preflight(request) if plan.cors is not None else []
        headers.append((b"x-request-id", request.request_id.encode()))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        exchange.finish("preflight", "cors_preflight", 204)

    async def refused(self, refusal: Refusal, exchange: Exchange, send: Any) -> None:
        """Answer (unless the reply has started) and account for a refusal; 401 and 403 also emit `auth.refused`."""
        exchange.finish(refusal.decision, refusal.reason, refusal.status)
        exchange.detail = refusal.detail
        services = self.services
        if refusal.status in (502, 504):
            services.metrics.upstream_errors.labels(exchange.route_id or "-", refusal.reason).inc()
        if not exchange.responded:
            exchange.response_bytes = await self.refuse(
                refusal, exchange.plan, exchange.request, exchange.seen.request_id, send)
        if refusal.status in (401, 403) and services.webhooks.targets("auth.refused"):
            await services.events.emit("auth.refused", {
                "route": exchange.route_id, "status": refusal.status, "reason": refusal.reason,
                "client_ip": exchange.request.client_ip if exchange.request is not None else None,
                "authenticator": exchange.auth_name, "request_id": exchange.seen.request_id,
            })

    def record(self, exchange: Exchange) -> None:
        total = time.perf_counter() - exchange.started
        plan = exchange.plan
        route = plan.route.id if plan is not None else None
        line = exchange.audit_line(route, total)
        if plan is None or plan.config.audit:  # route `audit: false` (probes): metrics only
            self.services.audit.record(line)
        self.services.metrics.request(route or "-", exchange.decision, total, exchange.upstream_seconds,
                                      exchange.status, exchange.mode)
        if exchange.trace is not None:
            exchange.trace.end(line)

    async def admit(self, policy: Policy, plan: RoutePlan, request: RequestView,
                    exchange: Exchange) -> tuple[Authenticator | None, Identity | None]:
        """Authenticate, then the route's `require`. On a `mode: report_only` route a 401/403 is only recorded
        (decision `would_deny`, its reason): the request goes on with the identity of an accepted credential, if any."""
        try:
            auth, identity = await self.authenticate(plan, request)
            exchange.auth_name, exchange.identity = auth.name, identity
            authorize(plan.config, identity, request.client_ip, policy.clients, auth.client_bound,
                      request.client_cert)
            return auth, identity
        except Refusal as refusal:
            if not plan.report_only or refusal.status not in (401, 403):
                raise
            exchange.finish("would_deny", refusal.reason, refusal.status)
            exchange.detail = refusal.detail
            self.services.metrics.would_deny.labels(plan.route.id, refusal.reason).inc()
            return None, exchange.identity

    async def authenticate(self, plan: RoutePlan, request: RequestView) -> tuple[Authenticator, Identity]:
        for auth in plan.authenticators:
            try:  # an oversized credential is refused by credential() itself: with this authenticator's challenge
                credential = auth.credential(request)
                if credential is None:
                    continue  # not its kind of credential: the next authenticator is tried
                return auth, await self.services.cache.resolve(auth, credential, request)
            except Unauthenticated as refusal:
                refusal.bearer_challenge = auth.bearer
                raise
        raise MissingCredentials("no credential was presented", detail="missing")

    async def forward(
        self, policy: Policy, plan: RoutePlan, request: RequestView, auth: Authenticator | None,
        identity: Identity | None, receive: Any, send: Any, exchange: Exchange,
    ) -> None:
        """Send the request upstream with the identity set and the route's strips, and stream the reply back."""
        body: Any
        body_length = None
        if request.body is not None:
            body = strip_body(request.body, request.content_type(), plan.strip.body_fields)
            body_length = len(body) if (body or request.header(b"content-length") is not None) else None
        elif exchange.seen.has_body:
            body = stream_body(receive)
        else:
            body = None
        headers = build_headers(
            request, identity, plan.strip, policy.identity_headers,
            trusted_peer=is_trusted_peer(request.peer_ip, policy.trusted_proxies),
            signed_token=self.services.identity_token(identity) if identity is not None else None,
            body_length=body_length,
        )
        query = strip_query(request.query_string, plan.strip.query)
        started = time.perf_counter()
        upstream = tracing.start_upstream(headers)  # None when off; else a client span, traceparent in headers
        try:
            response = await plan.transport.send(request.method, target(plan.base_path, request.path, query),
                                                 headers, body)
        except BaseException:
            if upstream is not None:
                upstream.end(None)
            raise
        if upstream is not None:
            upstream.end(response.status)
        upstream_seconds = time.perf_counter() - started
        emits = [e for e in plan.config.emit if _status_matches(e.when, response.status)] if plan.config.emit else None
        captured: list[bytes] | None = [] if emits else None
        cap = max((e.max_body for e in emits), default=0) if emits else 0
        size = 0
        try:
            response_headers = response.headers
            response_headers.append((b"x-request-id", request.request_id.encode()))
            if auth is not None and identity is not None:
                response_headers.extend(auth.response_headers(identity, request))
            if plan.cors is not None:
                plan.cors.add_to(response_headers, request)
            await send({"type": "http.response.start", "status": response.status, "headers": response_headers})
            exchange.responded = True
            async for chunk in response.body():
                if chunk:
                    size += len(chunk)
                    if captured is not None:
                        if size <= cap:
                            captured.append(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()
        if emits:
            # The caller already has the whole reply; the event is queued before this handler returns.
            data = event_data(b"".join(captured or []), size, cap, identity, plan.route.id)
            for emit in emits:
                await self.services.events.emit(emit.event, data)
        exchange.upstream_seconds = upstream_seconds
        exchange.response_bytes = size
        exchange.finish(exchange.decision or "allow", exchange.reason or "ok", response.status)  # or would_deny

    async def tunnel(self, policy: Policy, plan: RoutePlan, request: RequestView, identity: Identity | None,
                     client: ClientConnection, send: Any, exchange: Exchange) -> None:
        """An authorised WebSocket handshake: forwarded with the credentials stripped and the identity set, then
        spliced until either side closes (proxy/websocket.py); 403 on a route with `websocket: false`."""
        if plan.websocket is None or plan.upstream is None:
            raise Forbidden("this route does not accept WebSocket connections", reason="websocket_refused")
        origin = request.header(b"origin")
        if plan.cors is not None and origin is not None and not plan.cors.allows(origin):
            # Browsers send cookies with a cross-site handshake and no CORS check guards it (cross-site WebSocket
            # hijacking): on a route with `cors`, only its allowed origins may open one.
            raise Forbidden("this origin may not open WebSocket connections here", reason="origin_not_allowed")
        headers = build_headers(request, identity, plan.strip, policy.identity_headers,
                                trusted_peer=is_trusted_peer(request.peer_ip, policy.trusted_proxies),
                                signed_token=self.services.identity_token(identity) if identity else None)
        query = strip_query(request.query_string, plan.strip.query)
        head = handshake_head(target(plan.base_path, request.path, query), headers)
        timeouts = policy.config.timeouts
        status, why = await self.services.tunnels.run(
            client, plan.upstream, plan.upstream_tls, head, plan.websocket, identity,
            (timeouts.connect, timeouts.read), request.request_id, send)
        exchange.responded = True
        exchange.detail = exchange.detail or (f"tunnel closed: {why}" if why else "")
        exchange.finish(exchange.decision or "allow", exchange.reason or "ok", status)  # or would_deny

    async def refuse(
        self, refusal: Refusal, plan: RoutePlan | None, request: RequestView | None, request_id: str, send: Any,
    ) -> int:
        if isinstance(refusal, MissingCredentials) and plan is not None:
            refusal.bearer_challenge = plan.bearer
        body = refusal.body()
        headers = refusal.headers(body)
        headers.append((b"x-request-id", request_id.encode()))
        if plan is not None and plan.cors is not None and request is not None:
            plan.cors.add_to(headers, request)  # so the page can read why it was refused
        login_url = plan.config.login_url if plan is not None else None
        if login_url and refusal.status == 401 and request is not None and request.host and _wants_html(request):
            # return_to is built from the request itself (Host validated, port kept), so it can only point back at
            # this host. Without a Host (HTTP/1.0) there is nothing to point back at: the JSON 401 instead.
            back = f"{request.scheme}://{request.host}{request.path}"
            if request.query_string:
                back += "?" + strip_query(request.query_string, plan.strip.query).decode("latin-1")  # type: ignore[union-attr]
            location = login_url + ("&" if "?" in login_url else "?") + "return_to=" + quote(back, safe="")
            await send({"type": "http.response.start", "status": 302, "headers": [
                (b"location", location.encode()), (b"cache-control", b"no-store"), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return 0
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return len(body)


def handshake_head(target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The upgrade request for the upstream: the forwarded headers (no body framing: a handshake has no body) and
    the two hop-by-hop fields that ask this next hop to upgrade (RFC 9110 §7.8)."""
    lines = [b"GET %s HTTP/1.1\r\n" % target]
    lines += [b"%s: %s\r\n" % (k, v) for k, v in headers if k not in (b"content-length", b"transfer-encoding")]
    lines.append(b"connection: upgrade\r\nupgrade: websocket\r\n\r\n")
    return b"".join(lines)


def normalise(scope: dict[str, Any]) -> str:
    raw = scope.get("raw_path")
    if raw is None:
        raw = scope["path"].encode("utf-8")
    return normalise_path(raw)


class SeenHeaders:
    """What the gateway needs from the request headers, found in one pass."""

    __slots__ = (
        "authority", "bad_framing", "bad_host", "content_length", "forwarded_for", "has_body", "host", "hosts",
        "request_id", "too_large", "user_agent",
    )

    def __init__(self) -> None:
        self.host = ""  # the host name routes match on: lower-case, no port
        self.authority = ""  # the Host header as sent, port kept (for return_to)
        self.bad_host = False
        self.hosts = 0
        self.forwarded_for: list[bytes] = []
        self.request_id = ""
        self.content_length: str | None = None
        self.has_body = False
        self.too_large = False
        self.bad_framing = False
        self.user_agent: str | None = None


def scan_headers(headers: list[tuple[bytes, bytes]]) -> SeenHeaders:
    seen = SeenHeaders()
    size = 0
    for key, value in headers:
        size += len(key) + len(value) + 4
        if key == b"host":
            seen.hosts += 1
            name = host_name(value)
            seen.bad_host = name is None
            seen.host = name or ""
            seen.authority = value.decode("latin-1")
        elif key == b"x-forwarded-for":
            seen.forwarded_for.append(value)
        elif key == b"x-request-id":
            if not seen.request_id and _REQUEST_ID.match(value):
                seen.request_id = value.decode("ascii")
        elif key == b"content-length":
            seen.content_length = value.decode("latin-1")
            if value.strip() not in (b"0", b""):
                seen.has_body = True
        elif key == b"user-agent":
            seen.user_agent = value[:USER_AGENT_MAX].decode("latin-1")  # bounded: the audit line stays a line
        elif key == b"transfer-encoding":
            seen.has_body = True
            if value.strip().lower() != b"chunked":
                seen.bad_framing = True  # only plain chunked is forwarded; anything else is a smuggling shape
    if not seen.request_id:
        seen.request_id = next_request_id()
    seen.too_large = size > MAX_HEADER_BYTES or len(headers) > MAX_HEADERS
    return seen


# RFC 9110 §7.2 / RFC 3986 §3.2.2: Host is `uri-host [":" port]`. The name is held to the characters a DNS name
# or IPv4 address uses (RFC 3986's unreserved set): no `@` (userinfo: `good.example@evil.example` names
# evil.example), no `/`, no second `:`, no percent-encoding (a browser decodes it: `evil%2eexample`), no empty name.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(?::[0-9]{0,5})?")


def host_name(value: bytes) -> str | None:
    """The host a Host header names, lower-case, port removed; None when the value is not a valid Host (400)."""
    match = _HOST.fullmatch(value)
    if match is None:
        return None
    name = match.group(1).decode("ascii").lower()
    if name.startswith("["):
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            return None
    return name


_ID_PREFIX = uuid.uuid4().hex[:12]
_ids = itertools.count(1)


def next_request_id() -> str:
    """Unique without a random draw per request: a random per-process prefix and a counter."""
    return f"{_ID_PREFIX}{next(_ids):012x}"


def _status_matches(when: str, status: int) -> bool:
    return when == "any" or str(status)[0] == when[0]


def event_data(body: bytes, size: int, cap: int, identity: Identity | None, route_id: str) -> dict[str, Any]:
    """The data of a route `emit` event: the upstream's JSON reply, plus `client` and `route` (SPEC §8)."""
    data: dict[str, Any]
    if size > cap:
        data = {"body_captured": False, "reason": f"the reply ({size} bytes) is larger than {cap} bytes"}
    else:
        try:
            reply = json.loads(body) if body else None
        except ValueError:
            reply = None
        data = dict(reply) if isinstance(reply, dict) else {"reply": reply}
    data["client"] = identity.client if identity is not None else None
    data["route"] = route_id
    return data


def _wants_html(request: RequestView) -> bool:
    return "text/html" in (request.header(b"accept") or "")


async def read_body(receive: Any, limit: int, declared: str | None) -> bytes:
    """The whole body, for authenticators that read it; bounded by the route's `max_body` (413 above it)."""
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(f"the body is larger than {limit} bytes")
        except ValueError:
            raise BadRequest("invalid Content-Length") from None
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def stream_body(receive: Any) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return
