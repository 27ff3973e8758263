"""`POST {prefix}/keys` (SPEC §6, seed 001 "generateMapToken"): IP-bound keys for an authenticated client.

The client authenticates with its access token (`X-Client-Token` or `Authorization: Bearer`) or with HTTP
Basic id and secret (RFC 6749 §2.3.1). The request is JSON (or form-encoded) `{user, ip?, expiry_minutes?,
simple_date?, url_logout?, single_use?}`, or the SOAP `generateMapToken` envelope of the seed, whose
`<entry key=".." value=".."/>` map carries the same names. `user` and at least one of `ip` and
`expiry_minutes` are required. JSON is answered `{"key": "..."}`, SOAP with a `generateMapTokenResponse`.
Errors are RFC 6749 §5.2-style JSON (SOAP: a Fault). The key itself is never logged nor put in an event.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.authn.ip_key_sealing import KeyClaims, keyring_for
from sidecar.errors import OAuthError, Refusal
from sidecar.ip_addresses import canonical_ip
from sidecar.issuer.client_secret import decode_basic, verify_client_secret
from sidecar.issuer.soap import (
    SoapRequest,
    fault,
    generate_map_token_reply,
    parse_generate_map_token,
    soap_version_of,
)
from sidecar.request_body import read_limited
from sidecar.state.attempt_limits import source_address
from sidecar.state.client_token_store import token_hash

if TYPE_CHECKING:
    from sidecar.issuer.context import IssuerContext

__all__ = ["key_claims", "key_routes"]

MAX_BODY = 64 * 1024
MAX_EXPIRY_MINUTES = 366 * 24 * 60
FIELDS = ("user", "ip", "expiry_minutes", "simple_date", "url_logout", "single_use")
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # a key is a credential (RFC 6749 §5.1)


def _bad(description: str) -> OAuthError:
    return OAuthError("invalid_request", description)


def _unauthorised(description: str) -> OAuthError:
    return OAuthError.invalid_client(description)


def key_routes(services: IssuerContext) -> list[Route]:
    return [Route("/keys", KeyEndpoint(services).handle, methods=["POST"])]


class KeyEndpoint:
    def __init__(self, services: IssuerContext) -> None:
        self.services = services

    async def handle(self, request: Request) -> Response:
        client_id: str | None = None
        content_type = request.headers.get("content-type", "")
        soap_version: str | None = None
        soap: SoapRequest | None = None
        try:
            body = await read_limited(request, MAX_BODY)
            if body is None:
                raise _bad(f"the request body is larger than {MAX_BODY} bytes")
            if _is_xml(content_type, body):
                soap_version = soap_version_of(content_type)
            client_id = await self._client(request)
            if soap_version is not None:
                soap = parse_generate_map_token(body)
                soap_version = soap.version
            fields = soap.entries if soap is not None else _fields(content_type, body)
            claims = key_claims(client_id, fields, time.time())
            key = keyring_for(self.services.config).seal(claims)
        except Refusal as refusal:  # the request's own fault, or the store is down while looking up a token
            return self._refuse(client_id, OAuthError.of(refusal), soap_version)
        expires = datetime.fromtimestamp(claims.expires_at, UTC).isoformat() if claims.expires_at else None
        await self.services.events.emit("key.issued", {"client": client_id, "user": claims.user,
                                                       "single_use": claims.single_use, "expires_at": expires})
        self.services.audit.write(kind="key", client=client_id, subject=claims.user, decision="allow",
                                  reason="issued", status=200, ip_bound=claims.ip is not None, expires_at=expires)
        if soap is not None:
            text, content_type = generate_map_token_reply(soap, key)
            return Response(text, media_type=content_type, headers=NO_STORE)
        return JSONResponse({"key": key}, headers=NO_STORE)

    def _refuse(self, client_id: str | None, error: OAuthError, soap_version: str | None) -> Response:
        self.services.audit.write(kind="key", client=client_id, decision=error.decision, reason=error.reason,
                                  status=error.status)
        if soap_version is None:
            return error.response()
        text, content_type, status = fault(soap_version, error.status, error.description)
        headers = {name.decode(): value.decode() for name, value in error.headers() if name != b"content-length"}
        headers.pop("content-type")
        return Response(text, status_code=status, media_type=content_type, headers=headers)

    async def _client(self, request: Request) -> str:
        """The authenticated client's id: by its access token, or by HTTP Basic id and secret."""
        tokens = request.headers.getlist("x-client-token")
        authorization = request.headers.getlist("authorization")
        if len(tokens) > 1 or len(authorization) > 1:
            raise _bad("send the client credentials once")
        scheme, _, value = (authorization[0] if authorization else "").strip().partition(" ")
        # A blank token is no credential (as for the authenticators, SPEC §3): the next method is tried.
        token = (tokens[0] if tokens else "").strip() or (value.strip() if scheme.lower() == "bearer" else "")
        address = source_address(request.client.host if request.client else None, request.headers.raw,
                                 self.services.config.trusted_proxies)
        if token:
            attempt = await self.services.attempts.begin("keys", address)
            found = await self.services.client_tokens.lookup(token_hash(token))
            if found is None or found[0] not in self.services.clients:
                await attempt.failed()
                raise _unauthorised("unknown or revoked client token")
            await attempt.succeeded()
            return found[0]
        if scheme.lower() == "basic":
            return await self._basic(value.strip(), address)
        raise _unauthorised("authenticate the client: X-Client-Token, Authorization: Bearer, or HTTP Basic")

    async def _basic(self, value: str, address: str) -> str:
        decoded = decode_basic(value)
        if decoded is None:
            raise _unauthorised("the Basic credentials are not valid base64 of client_id:client_secret")
        known = decoded[0] if decoded[0] in self.services.clients else None
        attempt = await self.services.attempts.begin("keys", address, known)
        client = verify_client_secret(self.services.clients, *decoded)
        if client is None:
            await attempt.failed()
            raise _unauthorised("unknown client or wrong client secret")
        await attempt.succeeded()
        return client.id


def _is_xml(content_type: str, body: bytes) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("text/xml", "application/xml", "application/soap+xml") or body.lstrip().startswith(b"<")


def _fields(content_type: str, body: bytes) -> dict[str, Any]:
    media = content_type.split(";", 1)[0].strip().lower()
    try:
        if media == "application/x-www-form-urlencoded":
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
            if len({name for name, _ in pairs}) != len(pairs):
                raise _bad("a field is sent more than once")
            return dict(pairs)
        data = json.loads(body) if body else None
    except (UnicodeDecodeError, ValueError):
        raise _bad("the body is not valid JSON (or form encoding); send {\"user\": ..., \"ip\": ...}") from None
    if not isinstance(data, dict):
        raise _bad("send a JSON object: {\"user\": ..., \"ip\": ... and/or \"expiry_minutes\": ...}")
    return data


def key_claims(client_id: str, fields: dict[str, Any], now: float) -> KeyClaims:
    """The claims of the key to issue, from the request's fields; `OAuthError` (400) with the fix."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(unknown)}; use {', '.join(FIELDS)}")
    fields = {k: v for k, v in fields.items() if v is not None and v != ""}
    user = fields.get("user")
    if isinstance(user, int) and not isinstance(user, bool):
        user = str(user)  # a numeric login sent as a JSON number
    if not isinstance(user, str) or not user.strip():
        raise _bad("user is required: the login the key stands for")
    if len(user) > 256 or not user.isprintable():
        raise _bad("user must be at most 256 printable characters")
    if "ip" not in fields and "expiry_minutes" not in fields:
        raise _bad("give ip and/or expiry_minutes: a key must be bound to an address, a lifetime, or both")
    ip = _ip(fields["ip"]) if "ip" in fields else None
    expires_at = _expiry(fields, now) if "expiry_minutes" in fields else None
    if "simple_date" in fields and expires_at is None:
        raise _bad("simple_date is when expiry_minutes starts; send expiry_minutes too")
    return KeyClaims(user=user, client=client_id, issued_at=int(now), ip=ip, expires_at=expires_at,
                     single_use=_flag(fields.get("single_use", False)), url_logout=_url(fields.get("url_logout")))


def _ip(value: Any) -> str:
    try:
        return canonical_ip(str(value))
    except ValueError:
        raise _bad("ip is not an IP address (IPv4 such as 200.10.1.2, or IPv6)") from None


def _expiry(fields: dict[str, Any], now: float) -> int:
    minutes = fields["expiry_minutes"]
    if isinstance(minutes, str) and minutes.strip().isdigit():
        minutes = int(minutes.strip())
    if not isinstance(minutes, int) or isinstance(minutes, bool) or not 0 < minutes <= MAX_EXPIRY_MINUTES:
        raise _bad(f"expiry_minutes must be a whole number of minutes from 1 to {MAX_EXPIRY_MINUTES}")
    start = now
    if "simple_date" in fields:
        # The seed's simple_date is when the partner asked; a date later than now cannot lengthen the key.
        start = min(now, _simple_date(fields["simple_date"]))
    expires_at = int(start + minutes * 60)
    if expires_at <= now:
        raise _bad("the key would already be expired: simple_date + expiry_minutes is in the past (a date "
                   "without a UTC offset is read in the sidecar's local time zone; add one, e.g. -03:00)")
    return expires_at


def _simple_date(value: Any) -> float:
    """`2018-12-31 23:59` (as in the seed), seconds optional, or ISO 8601 with an offset. A date without an
    offset is read in the sidecar's local time zone (set TZ), as the seed's own service did."""
    try:
        parsed = datetime.fromisoformat(str(value).strip())
    except ValueError:
        raise _bad("simple_date must look like 2018-12-31 23:59 (or ISO 8601 with an offset)") from None
    return parsed.timestamp() if parsed.tzinfo else parsed.astimezone().timestamp()


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "s", "sim"):
        return True
    if text in ("false", "0", "no", "n", "não", "nao"):
        return False
    raise _bad("single_use must be true or false")


def _url(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or len(text) > 2048 or not text.isprintable() \
            or " " in text:
        raise _bad("url_logout must be an absolute http(s) URL of at most 2048 characters")
    return text
