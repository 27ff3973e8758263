"""The admin API's OpenAPI 3 document, served at `GET /openapi.json` on the admin port (no auth: it describes,
it reveals nothing). Paths, methods and path parameters come from the admin app's own routes, so a route added
there is described at once; `OPERATIONS` adds what a route table cannot say (bodies, queries, answers).
Request schemas are deliberately loose (extra fields, any string): the fuzzing test sends what a careless or
hostile caller would, from this very document."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sidecar import __version__

OPEN = {"/healthz", "/readyz", "/metrics", "/openapi.json"}  # no admin token needed
UNAUTHORISED = {"description": "no or wrong admin token",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
PUBLIC_KEY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"publicKey": {"type": "string", "description": "PEM, or base64 of the PEM"}}}}}}

# (method, path) -> the parts of an operation the route table cannot tell.
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("get", "/healthz"): {"summary": "process up", "responses": {"200": {"description": "alive"}}},
    ("get", "/readyz"): {"summary": "configuration loaded, JWKS fetched; the body reports Redis's state",
                         "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}},
    ("get", "/metrics"): {"summary": "Prometheus metrics", "responses": {"200": {"description": "Prometheus text"}}},
    ("get", "/openapi.json"): {"summary": "this document", "responses": {"200": {"description": "OpenAPI 3"}}},
    ("get", "/admin/clients"): {"summary": "the configured clients and their token ids (never a token or hash)",
                                "responses": {"200": {"description": "clients"}}},
    ("post", "/admin/clients/{client_id}/tokens"): {
        "summary": "mint a client access token; the plaintext is returned this once",
        "responses": {"201": {"description": "{id, client, token, created}"},
                      "404": {"description": "no such client"}}},
    ("delete", "/admin/clients/{client_id}/tokens/{token_id}"): {
        "summary": "revoke a token (everywhere within 1 s)",
        "responses": {"204": {"description": "revoked"}, "404": {"description": "no such client or token"}}},
    ("put", "/admin/clients/{client_id}/public-key"): {
        "summary": "register or replace a client's public key (client_jwt)", "requestBody": PUBLIC_KEY,
        "responses": {"200": {"description": "registered"}, "400": {"description": "not a usable key"},
                      "404": {"description": "no such client"}}},
    ("patch", "/admin/clients/{client_id}/public-key"): {
        "summary": "register or replace a client's public key (client_jwt)", "requestBody": PUBLIC_KEY,
        "responses": {"200": {"description": "registered"}, "400": {"description": "not a usable key"},
                      "404": {"description": "no such client"}}},
    ("post", "/admin/identifiers"): {
        "summary": "map user identifiers for custom_sso",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "array", "items": {
            "type": "object", "properties": {"user_login": {"type": "string"},
                                             "client_application_id": {"type": "string"},
                                             "identifier": {"type": "string"}}}}}}},
        "responses": {"201": {"description": "mapped"}, "400": {"description": "malformed"},
                      "409": {"description": "identifier already mapped"}}},
    ("get", "/admin/webhooks/deliveries"): {
        "summary": "webhook deliveries, newest first",
        "parameters": [{"name": "status", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "pending, delivered or failed"},
                       {"name": "limit", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "1 to 1000, default 100"}],
        "responses": {"200": {"description": "{deliveries: [...]}"}, "400": {"description": "bad status or limit"}}},
    ("post", "/admin/webhooks/deliveries/{delivery_id}/retry"): {
        "summary": "deliver a failed delivery again",
        "responses": {"202": {"description": "scheduled"}, "404": {"description": "no such delivery"},
                      "409": {"description": "not failed"}}},
    ("post", "/admin/reload"): {
        "summary": "reload the configuration file now",
        "responses": {"200": {"description": "reloaded"},
                      "400": {"description": "the file is invalid; the old configuration stays"},
                      "409": {"description": "the file changes a key only a restart applies; the old one stays"}}},
}


def openapi_document(routes: list[BaseRoute]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        for method in sorted(m.lower() for m in (route.methods or {"GET"}) if m != "HEAD"):
            operation: dict[str, Any] = {"responses": {"200": {"description": "ok"}}}
            operation.update(OPERATIONS.get((method, route.path), {}))
            parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
                          for name in route.param_convertors]
            operation["parameters"] = [*parameters, *operation.get("parameters", [])]
            if not operation["parameters"]:
                del operation["parameters"]
            if route.path in OPEN:
                operation["security"] = []
            else:
                operation["responses"] = {**operation["responses"], "401": UNAUTHORISED}
            paths.setdefault(route.path, {})[method] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": "sidecar admin API", "version": __version__,
                 "description": "The admin port (SPEC section 7). Authorization: Bearer <admin.token>."},
        "components": {
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"},
                                                                    "error_description": {"type": "string"}}}},
        },
        "security": [{"admin": []}],
        "paths": paths,
    }


def with_openapi(app: Starlette) -> Starlette:
    """Add `GET /openapi.json`, describing the app's routes (itself included)."""

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    app.router.routes.append(Route("/openapi.json", openapi, methods=["GET"]))
    document = openapi_document(app.router.routes)
    return app
