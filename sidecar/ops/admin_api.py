"""The admin port (SPEC §7): health, readiness and metrics without auth; the admin API behind the admin
token (compared in constant time), every call an audit line."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.errors import NotFound, Refusal, TooManyAttempts, error_body
from sidecar.issuer.identifier_map import Identifiers, parse_mappings
from sidecar.ops.openapi import with_openapi
from sidecar.request_body import read_limited
from sidecar.state.attempt_limits import source_address

if TYPE_CHECKING:
    from sidecar.ops.admin_context import AdminContext

Handler = Callable[[Request], Awaitable[Response]]


def error(status: int, reason: str, description: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(reason, description), status_code=status, headers=headers, media_type="application/json")


async def json_body(request: Request, limit: int = 1024 * 1024) -> Any:
    body = await read_limited(request, limit)
    if body is None:
        raise Refusal("the body is too large", reason="payload_too_large")
    try:
        return json.loads(body)
    except ValueError:
        raise Refusal("the body is not valid JSON") from None


class AdminApi:
    def __init__(self, services: AdminContext) -> None:
        self.services = services

    def guarded(self, action: str, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            locked = await self.refused_attempt(request)
            if locked is not None:
                response: Response = locked
            elif not admin_token_ok(self.services, request.headers.get("authorization")):
                response = error(401, "invalid_token", "a valid admin token is required",
                                 {"WWW-Authenticate": 'Bearer realm="sidecar-admin"'})
            else:
                try:
                    response = await handler(request)
                except Refusal as refusal:
                    response = error(refusal.status, refusal.reason, refusal.description)
            self.services.audit.write(kind="admin", action=action, method=request.method,
                                      client=request.path_params.get("client_id"), status=response.status_code,
                                      peer=request.client.host if request.client else None)
            return response

        return endpoint

    async def refused_attempt(self, request: Request) -> Response | None:
        """429 while this address is locked out after failed admin tokens; else the token check counted."""
        address = source_address(request.client.host if request.client else None, request.headers.raw,
                                 self.services.config.trusted_proxies)
        try:
            attempt = await self.services.attempts.begin("admin", address)
        except TooManyAttempts as refusal:
            return refusal.response()
        if admin_token_ok(self.services, request.headers.get("authorization")):
            await attempt.succeeded()
        else:
            await attempt.failed()
        return None

    def client_or_404(self, request: Request) -> tuple[str, Any]:
        client_id = request.path_params["client_id"]
        client = self.services.policy.clients.get(client_id)
        if client is None:
            raise NotFound(f"no client {client_id!r} is configured")
        return client_id, client

    async def list_clients(self, request: Request) -> Response:
        clients = []
        for client in self.services.policy.config.clients:
            clients.append({
                "id": client.id, "name": client.name, "routes": client.routes, "scopes": client.scopes,
                "tokens": await self.services.client_tokens.listing(client.id),
            })
        return JSONResponse({"clients": clients})

    async def mint_token(self, request: Request) -> Response:
        client_id, _ = self.client_or_404(request)
        minted = await self.services.client_tokens.mint(client_id)
        await self.services.events.emit("client.token.created", {
            "client": client_id, "token_id": minted["id"], "created": minted["created"]})
        return JSONResponse(minted, status_code=201, headers={"Cache-Control": "no-store"})

    async def revoke_token(self, request: Request) -> Response:
        client_id, _ = self.client_or_404(request)
        token_id = request.path_params["token_id"]
        if await self.services.client_tokens.revoke(client_id, token_id) is None:
            return error(404, "not_found", f"client {client_id!r} has no token {token_id!r}")
        await self.services.events.emit("client.token.revoked", {"client": client_id, "token_id": token_id})
        return Response(status_code=204)

    async def register_public_key(self, request: Request) -> Response:
        client_id, _ = self.client_or_404(request)
        body = await json_body(request, limit=64 * 1024)
        pem = body.get("publicKey") if isinstance(body, dict) else None
        if not isinstance(pem, str) or not pem.strip():
            return error(400, "invalid_request", 'send {"publicKey": "<PEM public key, or base64 of the PEM>"}')
        try:
            registered = await self.services.client_keys.register(client_id, pem)
        except ValueError as exc:  # the message says what is wrong with the key, never repeats it
            return error(400, "invalid_request", f"publicKey: {exc}")
        await self.services.events.emit("client.public_key.updated", registered)
        return JSONResponse(registered)

    async def map_identifiers(self, request: Request) -> Response:
        mappings = parse_mappings(await json_body(request), self.services.policy.clients)
        await Identifiers(self.services.store).add(mappings)
        return JSONResponse({"created": len(mappings)}, status_code=201)

    async def reload(self, request: Request) -> Response:
        result = await self.services.reload_from_file("admin api")
        if result.restart:  # a valid file, but it changes what only a restart applies: nothing was applied
            return JSONResponse({"reloaded": False, "errors": result.errors, "restart_required": result.restart},
                                status_code=409)
        if not result.applied:
            return JSONResponse({"reloaded": False, "errors": result.errors}, status_code=400)
        _tell_siblings_to_reload()
        return JSONResponse({"reloaded": True, "routes": len(self.services.policy.config.routes)})

    def routes(self) -> list[Route]:
        g = self.guarded
        return [
            Route("/admin/reload", g("reload", self.reload), methods=["POST"]),
            Route("/admin/clients", g("clients.list", self.list_clients), methods=["GET"]),
            Route("/admin/clients/{client_id}/tokens", g("token.mint", self.mint_token), methods=["POST"]),
            Route("/admin/clients/{client_id}/tokens/{token_id}", g("token.revoke", self.revoke_token),
                  methods=["DELETE"]),
            Route("/admin/clients/{client_id}/public-key", g("public_key.register", self.register_public_key),
                  methods=["PUT", "PATCH"]),
            Route("/admin/identifiers", g("identifiers.map", self.map_identifiers), methods=["POST"]),
        ]


def _tell_siblings_to_reload() -> None:
    """Under `--workers N`, the supervisor passes SIGHUP to every worker: all of them reload, not just this one."""
    import os
    import signal

    supervisor = os.environ.get("SIDECAR_SUPERVISOR_PID")
    if supervisor and supervisor.isdigit() and int(supervisor) == os.getppid():
        os.kill(int(supervisor), signal.SIGHUP)


def admin_app(services: AdminContext, extra_routes: list[Route] | None = None) -> Starlette:
    """The admin port's app. `extra_routes` are other parts' admin handlers (the webhook worker's): each is
    mounted behind the admin token and audited like the API's own, the route's `name` being the audit action."""
    api = AdminApi(services)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        problems = await readiness_problems(services)
        body: dict[str, Any] = {"status": "not ready", "problems": problems} if problems else {"status": "ready"}
        body["report_only_routes"] = sum(1 for route in services.policy.config.routes if route.mode == "report_only")
        redis = redis_report(services)
        if redis is not None:
            body["redis"] = redis
        return JSONResponse(body, status_code=503 if problems else 200)

    async def metrics(request: Request) -> Response:
        return Response(services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return with_openapi(Starlette(routes=[
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        *api.routes(),
        *(Route(route.path, api.guarded(route.name, route.endpoint), methods=route.methods)
          for route in extra_routes or []),
    ]))


async def readiness_problems(services: AdminContext) -> list[str]:
    problems = []
    for name, auth in services.policy.authenticators.items():
        jwks = auth.key_set
        if jwks is not None and not jwks.loaded:
            problems.append(f"authenticator {name}: JWKS not fetched yet")
    return problems


# What needs Redis, by authenticator type, when Redis cannot be used (README "Sizing and scale-out").
_NEEDS_REDIS = {"client_token": "client tokens", "client_jwt": "client JWTs (registered keys, jti replay marks)",
                "ip_key": "single-use keys"}


def redis_report(services: AdminContext) -> dict[str, Any] | None:
    """Redis's state for /readyz's body. Redis trouble does not make the process not ready — every replica
    shares the one Redis, so failing readiness on it would take them all out of service at once (a partial
    outage made total); what needs Redis answers 503 per request instead, and this says which, since when."""
    store: Any = services.store
    if not store.shared:
        return None
    health = store.health  # probed in the background every few seconds: never make the probe wait on Redis
    report: dict[str, Any] = health.as_dict()
    types = {name: cfg.type for name, cfg in services.policy.loaded.authenticators.items()}
    if not health.healthy:
        down = not health.reachable or health.cluster_state not in (None, "ok")
        failing = [f"authenticator {name}: {_NEEDS_REDIS[kind]}" for name, kind in sorted(types.items())
                   if kind in _NEEDS_REDIS and (down or kind == "client_token")]
        if down:
            failing.append("admin API: minting and revoking tokens, public keys, identifiers")
            if services.policy.config.webhooks:
                failing.append("webhooks: events raised now wait in the local spool")
        report["failing_closed"] = failing
    return report


def admin_token_ok(services: AdminContext, header: str | None) -> bool:
    expected = services.config.admin.token
    if not expected or not header:
        return False
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())
