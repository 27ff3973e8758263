"""Asking an external webservice whether a credential is good (seed 001): the `remote` authenticator, the
`cookie` authenticator's `revalidate`, and the issuer's `credentials` service for the password grant.

`RemoteCheck` is the configuration block; `check(http, cfg, value)` makes one call and reads the answer as

- `boolean` — the body is one word: 1/0, true/false, S/N, yes/no, sim/não (case and whitespace ignored);
- `json_status` — `{"status": "OK", "userData": {...}}` or `{"status": "ERROR", "message": "..."}`;
- `introspection` — an RFC 7662 token introspection response (`active`, `sub`, `scope`, `client_id`, `exp`).

It returns an accepted or rejected `CheckResult`, or raises `DependencyUnavailable` (503) when the service
cannot be reached in time, answers with an error status, or answers something that is neither a clear yes
nor a clear no: a doubtful answer is never read as a yes. The value is never logged nor put in an error.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, quote_plus, urlsplit

from pydantic import field_validator, model_validator

from sidecar.config.types import Duration, Model
from sidecar.errors import DependencyUnavailable
from sidecar.ops import tracing
from sidecar.outbound.guard import ServiceClient, UnsafeDestination, forbidden_reason, literal_address, url_refusal
from sidecar.outbound.httpx_errors import HttpxErrors
from sidecar.timestamps import timestamp

__all__ = ["CheckResult", "RemoteCheck", "check"]

PLACEHOLDER = "{value}"
_TRUE = frozenset({"1", "true", "s", "sim", "yes"})
_FALSE = frozenset({"0", "false", "n", "não", "nao", "no"})
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 9110 §5.6.2 token


class RemoteCheck(Model):
    url: str
    method: Literal["GET", "POST", "PUT"] = "GET"
    send: Literal["query", "form", "header", "json"] = "query"
    param: str = "token"  # the query parameter, form field or JSON field carrying the value
    header: str | None = None  # the header carrying the value, with `send: header`
    response: Literal["boolean", "json_status", "introspection"] = "boolean"
    subject_claim: str | None = None  # the userData field (or introspection member) naming the subject
    timeout: Duration = 2.0
    cache_ttl: Duration | None = None
    negative_ttl: Duration | None = None
    headers: dict[str, str] = {}  # static extra headers, e.g. an API key
    # The operator wrote this URL: usually the customer's own service in the same pod or network, so internal
    # addresses are allowed. `false` turns on the address guard webhooks always have (sidecar.outbound.guard).
    allow_private: bool = True
    client_id: str | None = None  # introspection: the sidecar's own client credentials (RFC 7662 §2.1)
    client_secret: str | None = None
    token_type_hint: str | None = None
    max_response_bytes: int = 64 * 1024

    @model_validator(mode="before")
    @classmethod
    def _introspection_defaults(cls, data: Any) -> Any:
        # RFC 7662 §2.1: the token is POSTed as the form field `token`; spare the user from saying so.
        if isinstance(data, dict) and data.get("response") == "introspection":
            data = {"method": "POST", "send": "form", "param": "token", **data}
        return data

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value.count(PLACEHOLDER) > 1:
            raise ValueError("url holds {value} more than once; put it once")
        parts = urlsplit(value.replace(PLACEHOLDER, "x"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL such as https://portal.example/valida_token?token={{value}}")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _HEADER_NAME.match(name) or any(c in str(text) for c in "\r\n\x00"):
                raise ValueError(f"header {name!r} is not a valid header name and value")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RemoteCheck:
        if self.send in ("form", "json") and self.method == "GET" and PLACEHOLDER not in self.url:
            raise ValueError(f"send: {self.send} puts the value in a body: use method POST or PUT")
        if self.send == "header" and not (self.header and _HEADER_NAME.match(self.header)):
            raise ValueError("send: header needs header: NAME (the header that carries the value)")
        if self.response == "introspection" and (self.method != "POST" or self.send != "form"):
            raise ValueError("introspection is a POST of the form field token (RFC 7662 §2.1); remove method/send")
        if (self.client_id is None) != (self.client_secret is None):
            raise ValueError("give both client_id and client_secret, or neither")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive, e.g. 2s")
        # With the guard on, literal internal addresses are refused here, at load; names when called.
        problem = url_refusal(self.url.replace(PLACEHOLDER, "x"), self.allow_private, what="validator")
        if problem:
            raise ValueError(problem)
        return self

    def warnings(self) -> list[str]:
        host = urlsplit(self.url.replace(PLACEHOLDER, "x")).hostname or ""
        if self.url.startswith("http://") and not _loopback(host):
            return ["the validation service is called over plain http: the credential crosses the network in clear"]
        return []


def _loopback(host: str) -> bool:
    """The service runs on this machine (or in this pod): plain http never leaves it."""
    host = host.removesuffix(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    ip = literal_address(host)
    reason = forbidden_reason(ip) if ip is not None else None
    return bool(reason and reason.startswith("loopback"))


@dataclass(frozen=True, slots=True)
class CheckResult:
    accepted: bool
    subject: str | None = None
    client: str | None = None
    scopes: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=dict)  # json_status userData, or the introspection answer
    expires_at: float | None = None  # introspection `exp`: a cached yes must not outlive it
    message: str = ""  # why the service said no (its own words, with the value redacted)


_CALL_ERRORS = HttpxErrors(DependencyUnavailable, "the validation service is unreachable",
                           timeout_message="the validation service did not answer in time", detail=True)


class _Malformed(Exception):
    pass


class _Unsendable(Exception):
    """A value no header can carry (control or non-ASCII characters): it cannot be anyone's valid token."""


async def check(
    http: ServiceClient, cfg: RemoteCheck, value: str | None, extra_fields: Mapping[str, str] | None = None,
) -> CheckResult:
    """Ask the service about `value` (and `extra_fields`, e.g. username and password for the password grant)."""
    secrets_sent = [v for v in (value, *(extra_fields or {}).values()) if v]
    try:
        with tracing.span("remote.check", **{"server.address": urlsplit(cfg.url).hostname or ""}), _CALL_ERRORS:
            status, body = await _call(http, cfg, value, dict(extra_fields or {}))
    except _Unsendable:
        return CheckResult(accepted=False, message="the value cannot be sent in a header")
    except UnsafeDestination as exc:
        raise DependencyUnavailable("the validation service is unavailable", detail=str(exc)) from None
    # A 4xx may still be a clear "no" (a service answering ERROR with 401); a yes only ever comes with a 2xx.
    readable = 200 <= status < 300 or (400 <= status < 500 and status not in (408, 429))
    if not readable:
        raise DependencyUnavailable("the validation service failed", detail=f"HTTP {status}")
    try:
        result = _READERS[cfg.response](cfg, body)
    except _Malformed as exc:
        raise DependencyUnavailable("the validation service gave an answer that cannot be read",
                                    detail=f"HTTP {status}: {exc}") from None
    if result.accepted and not 200 <= status < 300:
        raise DependencyUnavailable("the validation service gave a contradictory answer", detail=f"HTTP {status}")
    if not result.accepted:
        result = CheckResult(accepted=False, message=_redact(result.message, secrets_sent))
    return result


async def _call(
    http: ServiceClient, cfg: RemoteCheck, value: str | None, fields: dict[str, str],
) -> tuple[int, bytes]:
    url = cfg.url
    headers = {"Accept": "text/plain, */*" if cfg.response == "boolean" else "application/json", **cfg.headers}
    if PLACEHOLDER in url:
        if value is None:
            raise ValueError("this url needs a value for {value}")
        url = url.replace(PLACEHOLDER, quote(value, safe=""))
    elif value is not None:
        fields = {cfg.param: value, **fields} if cfg.send != "header" else fields
        if cfg.send == "header":
            if not (value.isascii() and value.isprintable()):
                raise _Unsendable
            headers[cfg.header or cfg.param] = value
    if cfg.response == "introspection":
        if cfg.token_type_hint:
            fields["token_type_hint"] = cfg.token_type_hint
        if cfg.client_id is not None:
            headers["Authorization"] = _basic(cfg.client_id, cfg.client_secret or "")
    request: dict[str, Any] = {}
    if fields:
        if cfg.send == "query":
            request["params"] = fields
        elif cfg.send == "form":
            request["data"] = fields
        elif cfg.send == "json":
            request["json"] = fields
        else:
            headers.update(fields)
    # With the guard on, the guarded client resolves the name once, checks every address and connects to a
    # checked one (sidecar.outbound.guard): a name answering "public" cannot then connect to 127.0.0.1.
    client = http if cfg.allow_private else http.guarded
    async with asyncio.timeout(cfg.timeout):  # the whole call, name resolution included
        async with client.stream(cfg.method, url, headers=headers, timeout=cfg.timeout, **request) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > cfg.max_response_bytes:
                    raise DependencyUnavailable("the validation service gave an answer that cannot be read",
                                                detail=f"answer larger than {cfg.max_response_bytes} bytes")
            return response.status_code, bytes(body)


def _basic(client_id: str, secret: str) -> str:
    # RFC 6749 §2.3.1: id and secret are form-urlencoded before they are joined for HTTP Basic.
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _text(body: bytes) -> str:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = body.decode("latin-1")  # PHP pages often answer in ISO-8859-1
    return unicodedata.normalize("NFC", text.strip().lstrip("\ufeff").strip())


def _json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(_text(body))
    except ValueError:
        raise _Malformed("not JSON") from None
    if not isinstance(data, dict):
        raise _Malformed("not a JSON object")
    return data


def _read_boolean(cfg: RemoteCheck, body: bytes) -> CheckResult:
    word = _text(body).lower()
    if word in _TRUE:
        return CheckResult(accepted=True)
    if word in _FALSE:
        return CheckResult(accepted=False, message="the service answered no")
    raise _Malformed("not one of 1/0, true/false, S/N, yes/no, sim/não")


def _subject(data: Mapping[str, Any], name: str | None, required: bool) -> str | None:
    if name is None:
        return None
    found = data.get(name)
    if isinstance(found, str | int) and not isinstance(found, bool) and str(found):
        return str(found)
    if required:
        raise _Malformed(f"the answer lacks the subject field {name!r}")
    return None


def _read_json_status(cfg: RemoteCheck, body: bytes) -> CheckResult:
    data = _json(body)
    status = data.get("status")
    if not isinstance(status, str):
        raise _Malformed("no status")
    if status.upper() == "ERROR":
        message = data.get("message")
        return CheckResult(accepted=False, message=str(message) if message else "the service answered ERROR")
    if status.upper() != "OK":
        raise _Malformed("status is neither OK nor ERROR")
    user_data = data.get("userData")
    if user_data is None:
        user_data = {}
    if not isinstance(user_data, dict):
        raise _Malformed("userData is not an object")
    return CheckResult(accepted=True, subject=_subject(user_data, cfg.subject_claim, True), claims=user_data)


def _read_introspection(cfg: RemoteCheck, body: bytes) -> CheckResult:
    data = _json(body)
    active = data.get("active")
    if not isinstance(active, bool):
        raise _Malformed("active is not a boolean")  # RFC 7662 §2.2: REQUIRED, boolean
    if not active:
        return CheckResult(accepted=False, message="the token is not active")
    exp = timestamp(data["exp"]) if "exp" in data else None
    if "exp" in data and exp is None:
        raise _Malformed("exp is not a timestamp")  # RFC 7662 §2.2: a NumericDate; Infinity would never expire
    if exp is not None and exp <= time.time():
        return CheckResult(accepted=False, message="the token has expired")
    scope = data.get("scope", "")
    if not isinstance(scope, str):
        raise _Malformed("scope is not a space-separated string")
    client = data.get("client_id")
    subject = _subject(data, cfg.subject_claim, True) if cfg.subject_claim else (
        _subject(data, "sub", False) or _subject(data, "username", False))
    return CheckResult(
        accepted=True, subject=subject, client=str(client) if isinstance(client, str | int) else None,
        scopes=frozenset(scope.split()), claims=data, expires_at=exp,
    )


_READERS = {"boolean": _read_boolean, "json_status": _read_json_status, "introspection": _read_introspection}


def _redact(message: str, secrets_sent: list[str]) -> str:
    """The service's own words, for the audit line: printable, short, and never the value we sent."""
    for secret in secrets_sent:
        message = message.replace(secret, "[redacted]")
    message = "".join(c if c.isprintable() else " " for c in message)
    return message[:200]
