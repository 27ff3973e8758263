"""Envoy's gRPC external authorization, `envoy.service.auth.v3.Authorization/Check` (SPEC §11), on
`--decision-grpc-port`: the `grpc` extra (`pip install 'sidecar[grpc]'`: grpcio, serving the method through a generic
handler, and envoy-data-plane, Envoy's API as betterproto2 messages under its own `envoy_data_plane` namespace; not
xds-protos, whose top-level `opentelemetry.proto` copy overwrites the otel extra's). Decided like every other
decision-mode ask (sidecar/proxy/decision.py `DecisionApp.ask`: the gateway's route, authenticate, authorise,
refusal, audit line and metrics).

Allow: status OK and an `OkHttpResponse` with the identity headers to set (`append_action:
OVERWRITE_IF_EXISTS_OR_ADD` explicitly: an unset action has meant "append" in some Envoy versions, beside a forged
value), `headers_to_remove` (every credential header and every client-sent header in the identity namespace) and
`query_parameters_to_remove` (the credential parameters present). Deny: a non-OK status (UNAUTHENTICATED for 401,
PERMISSION_DENIED otherwise) and a `DeniedHttpResponse` with proxy mode's status, headers and JSON body.
The client address: the gRPC peer (Envoy) and the `x-forwarded-for` Envoy passes, per `trusted_proxies`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, unquote_plus

import grpc
from envoy_data_plane.envoy.config.core.v3 import HeaderValue, HeaderValueOption, HeaderValueOptionHeaderAppendAction
from envoy_data_plane.envoy.service.auth.v3 import (
    AttributeContextHttpRequest,
    CheckRequest,
    CheckResponse,
    DeniedHttpResponse,
    OkHttpResponse,
)
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.rpc import Status

from sidecar.ip_addresses import canonical_ip
from sidecar.proxy.decision import DecisionApp, removals, stripped_cookie

if TYPE_CHECKING:
    from sidecar.proxy.decision import Scope

SERVICE = "envoy.service.auth.v3.Authorization"
OVERWRITE = HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
# google.rpc.Code values (the same numbers as gRPC's status codes).
OK, PERMISSION_DENIED, UNAUTHENTICATED = 0, 7, 16


def http_request(request: CheckRequest) -> AttributeContextHttpRequest:
    """The `attributes.request.http` of a check, empty where Envoy left a message out."""
    attributes = request.attributes
    http = attributes.request.http if attributes is not None and attributes.request is not None else None
    return http if http is not None else AttributeContextHttpRequest()


def original_scope(http: AttributeContextHttpRequest, peer: str) -> Scope:
    """The ASGI scope of the request Envoy asks about (its `AttributeContext.HttpRequest`)."""
    path, _, query = http.path.partition("?")
    raw = path.encode("latin-1")
    headers = [(name.lower().encode("latin-1"), value.encode("latin-1"))
               for name, value in http.headers.items() if not name.startswith(":")]
    if not any(name == b"host" for name, _ in headers):
        headers.append((b"host", (http.host or http.headers.get(":authority", "")).encode("latin-1")))
    return {"type": "http", "http_version": "1.1", "method": http.method or "GET", "raw_path": raw,
            "path": unquote(path), "query_string": query.encode("latin-1"), "headers": headers,
            "client": (peer, 0), "scheme": "https" if http.scheme == "https" else "http"}


def grpc_peer(context: grpc.aio.ServicerContext) -> str:
    """The address of the gRPC client (`ipv4:1.2.3.4:5`, `ipv6:[::1]:5`), canonical; 0.0.0.0 when unknown."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    address = rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else ""
    try:
        return canonical_ip(address)
    except ValueError:
        return "0.0.0.0"


class AuthorizationService:
    def __init__(self, decisions: DecisionApp) -> None:
        self.decisions = decisions

    async def Check(self, request: CheckRequest, context: grpc.aio.ServicerContext) -> CheckResponse:
        http = http_request(request)
        body = http.raw_body or http.body.encode("utf-8")
        original = original_scope(http, grpc_peer(context))
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        refusal: list[dict[str, Any]] = []

        async def answer(message: dict[str, Any]) -> None:
            refusal.append(message)

        asked = await self.decisions.ask(original, receive, answer)
        if asked is None:
            return denied(refusal)
        exchange, plan, view, identity = asked
        ok = OkHttpResponse(
            headers=[_header(name, value) for name, value in self.decisions.identity(view, identity)],
            headers_to_remove=[name.decode("latin-1") for name in removals(plan, view, self.decisions.gateway.services
                                                                           .policy)],
            query_parameters_to_remove=sorted({
                name for name in (unquote_plus(part.split("=", 1)[0])
                                  for part in view.query_string.decode("latin-1").split("&") if part)
                if name in plan.strip.query}),
        )
        cookie = stripped_cookie(plan, view)
        if cookie:
            ok.headers.append(_header(b"cookie", cookie))
        elif cookie is not None:
            ok.headers_to_remove.append("cookie")
        await self.decisions.allowed(exchange, plan, identity)
        return CheckResponse(status=Status(code=OK), ok_response=ok)


def _header(name: bytes, value: bytes) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=name.decode("latin-1"), value=value.decode("latin-1")), append_action=OVERWRITE)


def denied(messages: list[dict[str, Any]]) -> CheckResponse:
    """A refusal the gateway rendered as ASGI messages (start, body), as Envoy's denied response."""
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    status = start["status"]
    headers = [_header(name, value) for name, value in start["headers"] if name != b"content-length"]
    code = UNAUTHENTICATED if status == 401 else PERMISSION_DENIED
    return CheckResponse(
        status=Status(code=code),
        denied_response=DeniedHttpResponse(
            status=HttpStatus(code=StatusCode(status)), headers=headers, body=body.decode("utf-8", "replace")))


async def start_server(decisions: DecisionApp, host: str, port: int) -> grpc.aio.Server:
    """The gRPC server on host:port (SO_REUSEPORT, so `--workers N` processes share it)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    check = grpc.unary_unary_rpc_method_handler(AuthorizationService(decisions).Check,
                                                request_deserializer=CheckRequest.parse,
                                                response_serializer=bytes)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Check": check}),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address} (--decision-grpc-port)")
    await server.start()
    return server
