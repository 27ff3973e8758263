"""`POST {prefix}/oauth2/token` (SPEC §6): the OAuth2 token endpoint (RFC 6749 §3.2).

Parameters come form-encoded in the body (RFC 6749 §4.4.2); `grant_type` alone may also come in the query
string, as TOTVS clients send it (seed 003), and then in the body too if with the same value — nothing else may,
so no secret ever travels in a URL. Every reply, success or error, carries `Cache-Control: no-store` and
`Pragma: no-cache` (RFC 6749 §5.1).
Without `issuer.signing_key` there is no token endpoint: it answers 404 (SPEC §2, "absent: no token endpoint").
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.errors import OAuthError, Refusal
from sidecar.issuer.client_secret import decode_basic, verify_client_secret
from sidecar.issuer.grants import GRANTS
from sidecar.request_body import read_limited
from sidecar.state.attempt_limits import source_address

if TYPE_CHECKING:
    from sidecar.issuer.context import IssuerContext

MAX_BODY = 64 * 1024
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class TokenEndpoint:
    def __init__(self, services: IssuerContext) -> None:
        self.services = services

    async def handle(self, request: Request) -> Response:
        if not self.services.signing:
            return OAuthError("not_found", "this sidecar has no token endpoint: issuer.signing_key is not set",
                              404).response()
        grant_type = client_id = None
        try:
            params = await form_params(request)
            grant_type = params.get("grant_type")
            grant = GRANTS.get(grant_type or "")
            if grant is None:
                raise unknown_grant(grant_type)
            credentials = client_credentials(request.headers.getlist("authorization"), params)
            client_id = credentials[0] if credentials else None
            if credentials is not None:
                await self._count_attempt(request, credentials)
            reply = await grant(self.services, params, credentials)
            status, decision, reason = 200, "allow", "ok"
            response: Response = JSONResponse(reply, headers=NO_STORE)
        except Refusal as refusal:  # the store or the credentials service is down (503): fail closed
            error = OAuthError.of(refusal, "temporarily_unavailable" if refusal.status == 503 else None)
            status, decision, reason, response = error.status, error.decision, error.reason, error.response()
        self.services.audit.write(kind="token", grant=grant_type if grant_type in GRANTS else None,
                                  client=client_id, decision=decision, reason=reason, status=status)
        return response

    async def _count_attempt(self, request: Request, credentials: tuple[str, str]) -> None:
        """`TooManyAttempts` while this address (or this client id from an unknown address) is locked out;
        else the secret check counted. The grant checks the secret again (a hash: cheap) and answers as before."""
        services = self.services
        address = source_address(request.client.host if request.client else None, request.headers.raw,
                                 services.config.trusted_proxies)
        client = credentials[0] if credentials[0] in services.clients else None
        attempt = await services.attempts.begin("token", address, client)
        if verify_client_secret(services.clients, *credentials) is None:
            await attempt.failed()
        else:
            await attempt.succeeded()


def token_routes(services: IssuerContext) -> list[Route]:
    return [Route("/oauth2/token", TokenEndpoint(services).handle, methods=["POST"])]


def unknown_grant(grant_type: str | None) -> OAuthError:
    if not grant_type:
        return OAuthError("invalid_request", "grant_type is required")
    return OAuthError("unsupported_grant_type",
                      "grant_type must be client_credentials, password or custom_sso")


async def form_params(request: Request) -> dict[str, str]:
    """The request's parameters. RFC 6749 §3.2: empty parameters are as if omitted, and none may repeat (within
    the body, or within the query string)."""
    body = await read_limited(request, MAX_BODY)
    if body is None:
        raise OAuthError("invalid_request", f"the request body is larger than {MAX_BODY} bytes")
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if body and content_type != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "send the parameters as application/x-www-form-urlencoded")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
        query = parse_qsl(request.url.query, keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the parameters are not valid form encoding") from None
    if any(name != "grant_type" for name, _ in query):
        raise OAuthError("invalid_request", "only grant_type may be sent in the query string; send the rest "
                                            "form-encoded in the body")
    params = _once(pairs)
    for name, value in _once(query).items():
        # A client pointed at `.../token?grant_type=client_credentials` (seed 003) may send grant_type in the body as
        # well, as any OAuth2 library does: the same value twice is one parameter; two values are a conflict.
        if params.setdefault(name, value) != value:
            raise OAuthError("invalid_request", f"the parameter {name} has different values in the query string "
                                                "and the body")
    return params


def _once(pairs: list[tuple[str, str]]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in pairs:
        if not value:
            continue
        if name in params:
            raise OAuthError("invalid_request", f"the parameter {name} is sent more than once")
        params[name] = value
    return params


def client_credentials(authorization: list[str], params: dict[str, str]) -> tuple[str, str] | None:
    """(client id, secret) from HTTP Basic or from the form (RFC 6749 §2.3.1) — one method only (§2.3)."""
    basic = None
    if len(authorization) > 1:
        raise OAuthError("invalid_request", "the Authorization header is sent more than once")
    if authorization:
        scheme, _, value = authorization[0].strip().partition(" ")
        if scheme.lower() == "basic":
            basic = _decode_basic(value.strip())
    form_id, form_secret = params.get("client_id"), params.get("client_secret")
    if basic is not None:
        if form_secret is not None or (form_id is not None and form_id != basic[0]):
            raise OAuthError("invalid_request", "authenticate the client once: HTTP Basic or form, not both")
        return basic
    if form_id is not None and form_secret is not None:
        return form_id, form_secret
    return None


def _decode_basic(value: str) -> tuple[str, str]:
    decoded = decode_basic(value)
    if decoded is None:
        raise OAuthError.invalid_client("the Basic credentials must be base64 of client_id:client_secret")
    return decoded


__all__ = ["NO_STORE", "TokenEndpoint", "token_routes"]
