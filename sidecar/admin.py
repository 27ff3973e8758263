"""The admin port (SPEC §7): health, readiness and metrics without auth; the admin API behind the admin
token, compared in constant time."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from sidecar.services import Services


def admin_app(services: Services) -> Starlette:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        problems = await readiness_problems(services)
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        return Response(services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return Starlette(routes=[
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ])


async def readiness_problems(services: Services) -> list[str]:
    problems = []
    if not services.ready:
        problems.append("configuration not loaded")
    for name, auth in services.policy.authenticators.items():
        jwks = getattr(auth, "jwks", None)
        if jwks is not None and not jwks.loaded:
            problems.append(f"authenticator {name}: JWKS not fetched yet")
    return problems


def admin_token_ok(services: Services, header: str | None) -> bool:
    expected = services.config.admin.token
    if not expected or not header:
        return False
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())
