"""The sidecar's own endpoints on the main port, under `issuer.prefix` (default `/_sidecar`, SPEC §6):
the OAuth2 token endpoint, the JWKS, and the key endpoint. Each capability contributes its routes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from sidecar.issuer.key_endpoint import key_routes
from sidecar.issuer.token_endpoint import token_routes

if TYPE_CHECKING:
    from sidecar.issuer.context import IssuerContext

DEFAULT_PREFIX = "/_sidecar"


def issuer_prefix(services: IssuerContext) -> str:
    issuer = services.config.issuer
    return (issuer.prefix if issuer else DEFAULT_PREFIX).rstrip("/")


def issuer_app(services: IssuerContext) -> Starlette:
    async def jwks(request: Request) -> Response:
        return JSONResponse(services.signing.jwks(), headers={"Cache-Control": "public, max-age=300"})

    routes = [Route("/.well-known/jwks.json", jwks, methods=["GET"]), *key_routes(services), *token_routes(services)]
    return Starlette(routes=[Mount(issuer_prefix(services), routes=routes)])
