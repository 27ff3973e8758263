"""Envoy's gRPC external authorization, `envoy.service.auth.v3.Authorization/Check` (SPEC §11), on
`--decision-grpc-port`: the `grpc` extra (`pip install 'sidecar[grpc]'`: grpcio and xds-protos, the generated
Envoy API). Decided like every other decision-mode ask (sidecar/proxy/decision.py `DecisionApp.ask`: the
gateway's route, authenticate, authorise, refusal, audit line and metrics).

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
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from sidecar.ip_addresses import canonical_ip
from sidecar.proxy.decision import DecisionApp, removals, stripped_cookie

if TYPE_CHECKING:
    from sidecar.proxy.decision import Scope

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def original_scope(request: external_auth_pb2.CheckRequest, peer: str) -> Scope:
    """The ASGI scope of the request Envoy asks about (its `AttributeContext.HttpRequest`)."""
    http = request.attributes.request.http
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


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, decisions: DecisionApp) -> None:
        self.decisions = decisions

    async def Check(self, request: external_auth_pb2.CheckRequest,
                    context: grpc.aio.ServicerContext) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        body = http.raw_body or http.body.encode("utf-8")
        original = original_scope(request, grpc_peer(context))
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
        ok = external_auth_pb2.OkHttpResponse(
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
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ok)


def _header(name: bytes, value: bytes) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name.decode("latin-1"), value=value.decode("latin-1")), append_action=OVERWRITE)


def denied(messages: list[dict[str, Any]]) -> external_auth_pb2.CheckResponse:
    """A refusal the gateway rendered as ASGI messages (start, body), as Envoy's denied response."""
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    status = start["status"]
    headers = [_header(name, value) for name, value in start["headers"] if name != b"content-length"]
    code = code_pb2.UNAUTHENTICATED if status == 401 else code_pb2.PERMISSION_DENIED
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=status), headers=headers, body=body.decode("utf-8", "replace")))


async def start_server(decisions: DecisionApp, host: str, port: int) -> grpc.aio.Server:
    """The gRPC server on host:port (SO_REUSEPORT, so `--workers N` processes share it)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AuthorizationService(decisions), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address} (--decision-grpc-port)")
    await server.start()
    return server
