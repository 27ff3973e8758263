"""The error tree: every way a request is turned away, with its HTTP status and stable reason code, and the one
renderer of every JSON error body (`error_body`).

    Refusal                       decision "deny"
    ├── BadRequest                400 invalid_request
    ├── Unauthenticated           401 invalid_token (Bearer challenge)
    │   └── MissingCredentials    401 missing_credentials
    ├── Forbidden                 403 insufficient_scope / route_not_allowed / ip_not_allowed /
    │                                 client_cert_required / client_cert_not_allowed
    ├── NotFound                  404 not_found (admin API)
    ├── NoRoute                   404 no_route
    ├── Conflict                  409 conflict (admin API)
    ├── PayloadTooLarge           413 payload_too_large
    ├── HeadersTooLarge           431 headers_too_large
    ├── TooManyAttempts           429 too_many_attempts (+ Retry-After): locked out after failed secret checks
    ├── RateLimited               429 rate_limited (+ Retry-After): the route's rate_limit for this client or address
    ├── OAuthError                400 / 401 / 404 / 503: RFC 6749 §5.2 replies of the token and key endpoints
    │   └── SoapError             400 invalid_request: a generateMapToken envelope that cannot be read
    ├── Unavailable               decision "error": the sidecar or what it depends on failed, not the caller
    │   ├── UpstreamUnavailable   502 upstream_unavailable / upstream_tls_failed
    │   ├── DependencyUnavailable 503 dependency_unavailable (Redis, a validation service, an IdP's keys)
    │   ├── ShuttingDown          503 shutting_down (the --grace period ran out before the answer)
    │   ├── Overloaded            503 overloaded (+ Retry-After): more requests in flight than limits.max_in_flight
    │   └── UpstreamTimeout       504 upstream_timeout
    └── LoggedOut                 303 logged_out: not a refusal but answered like one (the ip_key logout redirect)

The `reason` goes into the JSON body (`error`), the audit line and the metrics; `decision` into the audit line
and the metrics. Descriptions are written by us, never copied from the credential. The SOAP face of the key
endpoint renders the same errors as SOAP Faults (sidecar/issuer/soap.py `fault`). Failures of outbound httpx
calls are mapped onto the `Unavailable` branch by sidecar/outbound/httpx_errors.py.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.responses import Response

Headers = list[tuple[bytes, bytes]]


def error_body(reason: str, description: str) -> bytes:
    """Every JSON error body the sidecar sends: `{"error": ..., "error_description": ...}` (RFC 6749 §5.2)."""
    return json.dumps({"error": reason, "error_description": description}).encode()


class Refusal(Exception):
    status = 400
    reason = "invalid_request"
    decision = "deny"
    bearer_challenge = False
    retry_after: int | None = None  # seconds, sent as Retry-After (429 too_many_attempts, 503 overloaded)

    def __init__(self, description: str = "", *, reason: str | None = None, detail: str = "") -> None:
        super().__init__(description)
        self.description = description
        if reason is not None:
            self.reason = reason
        # `detail` is for the audit line only (e.g. which check failed); never sent to the caller.
        self.detail = detail

    def body(self) -> bytes:
        return error_body(self.reason, self.description)

    def headers(self, body: bytes = b"") -> Headers:
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store"),
                   (b"content-length", str(len(body)).encode())]
        if self.bearer_challenge:
            challenge = f'Bearer realm="sidecar", error="{self.reason}"'
            if self.reason == "missing_credentials":
                challenge = 'Bearer realm="sidecar"'
            headers.append((b"www-authenticate", challenge.encode()))
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        return headers

    def response(self) -> Response:
        """This refusal as a Starlette response, for the endpoints served by Starlette (issuer, admin API)."""
        from starlette.responses import Response

        body = self.body()
        return Response(body, status_code=self.status,
                        headers={name.decode("latin-1"): value.decode("latin-1") for name, value in self.headers(body)})


class BadRequest(Refusal):
    status = 400
    reason = "invalid_request"


class Unauthenticated(Refusal):
    status = 401
    reason = "invalid_token"
    bearer_challenge = True


class MissingCredentials(Unauthenticated):
    reason = "missing_credentials"


class Forbidden(Refusal):
    status = 403
    reason = "insufficient_scope"


class NotFound(Refusal):
    status = 404
    reason = "not_found"


class Conflict(Refusal):
    status = 409
    reason = "conflict"


class NoRoute(Refusal):
    status = 404
    reason = "no_route"


class PayloadTooLarge(Refusal):
    status = 413
    reason = "payload_too_large"


class HeadersTooLarge(Refusal):
    status = 431
    reason = "headers_too_large"


class TooManyAttempts(Refusal):
    """Too many failed secret checks from this address (or for this client id from unknown addresses): the
    secret is not even checked until `Retry-After` seconds have passed (sidecar/state/attempt_limits.py). The
    token and key endpoints send it in their OAuth shape; `too_many_attempts` is an extension error code (RFC 6749
    §8.5) — RFC 8628's `slow_down` is a device-flow polling signal (400, "add 5 s"), not a lock-out."""

    status = 429
    reason = "too_many_attempts"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed authentication attempts; try again in {retry_after} s")
        self.retry_after = retry_after


class RateLimited(Refusal):
    """More requests than the route's `rate_limit` allows this client (or address): try again after Retry-After."""

    status = 429
    reason = "rate_limited"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many requests; try again in {retry_after} s")
        self.retry_after = retry_after


class OAuthError(Refusal):
    """An RFC 6749 §5.2 error reply (token endpoint, key endpoint): `reason` is the OAuth `error` code. Sent with
    `Pragma: no-cache` as well (§5.1), and on 401 with the HTTP Basic challenge the client may answer (§2.3.1)."""

    def __init__(self, error: str, description: str, status: int = 400, *, decision: str = "deny") -> None:
        super().__init__(description, reason=error)
        self.status = status
        self.decision = decision

    @classmethod
    def invalid_client(cls, description: str = "client authentication failed") -> OAuthError:
        return cls("invalid_client", description, 401)

    @classmethod
    def of(cls, refusal: Refusal, error: str | None = None) -> OAuthError:
        """Any refusal (the store or the credentials service is down: fail closed) in the OAuth shape."""
        if isinstance(refusal, OAuthError) and error is None:
            return refusal
        converted = cls(error or refusal.reason, refusal.description, refusal.status, decision=refusal.decision)
        converted.retry_after = refusal.retry_after
        return converted

    def headers(self, body: bytes = b"") -> Headers:
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store"),
                   (b"pragma", b"no-cache"), (b"content-length", str(len(body)).encode())]
        if self.status == 401:
            headers.append((b"www-authenticate", b'Basic realm="sidecar"'))
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        return headers


class SoapError(OAuthError):
    """A `generateMapToken` envelope that cannot be read (sidecar/issuer/soap.py); answered as a SOAP Fault."""

    def __init__(self, description: str) -> None:
        super().__init__("invalid_request", description)


class Unavailable(Refusal):
    """The sidecar could not answer because something it depends on failed: audited as `error`, not `deny`."""

    status = 503
    reason = "unavailable"
    decision = "error"


class UpstreamUnavailable(Unavailable):
    status = 502
    reason = "upstream_unavailable"


class DependencyUnavailable(Unavailable):
    status = 503
    reason = "dependency_unavailable"


class ShuttingDown(Unavailable):
    status = 503
    reason = "shutting_down"


class Overloaded(Unavailable):
    """More requests in flight in this worker than `limits.max_in_flight`: answered at once, not queued."""

    status = 503
    reason = "overloaded"

    def __init__(self, retry_after: int) -> None:
        super().__init__("the sidecar is overloaded; try again shortly")
        self.retry_after = retry_after


class UpstreamTimeout(Unavailable):
    status = 504
    reason = "upstream_timeout"


class LoggedOut(Refusal):
    """Not a refusal, but answered like one: a redirect that clears the session cookie (no upstream call)."""

    status = 303
    reason = "logged_out"

    def __init__(self, location: str, clear_cookie: str) -> None:
        super().__init__("logged out")
        self.location = location
        self.clear_cookie = clear_cookie

    def body(self) -> bytes:
        return b""

    def headers(self, body: bytes = b"") -> Headers:
        return [(b"location", self.location.encode("ascii")), (b"set-cookie", self.clear_cookie.encode("ascii")),
                (b"cache-control", b"no-store"), (b"content-length", b"0")]
