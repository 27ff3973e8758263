"""The refusal tree: every way a request is turned away, with its HTTP status and stable reason code.

    Refusal
    ├── BadRequest            400 invalid_request
    ├── Unauthenticated       401 missing_credentials / invalid_token
    ├── Forbidden             403 insufficient_scope / route_not_allowed / ip_not_allowed
    ├── NotFound              404 not_found (admin API)
    ├── NoRoute               404 no_route
    ├── Conflict              409 conflict (admin API)
    ├── PayloadTooLarge       413 payload_too_large
    ├── HeadersTooLarge       431 headers_too_large
    ├── UpstreamUnavailable   502 upstream_unavailable
    ├── DependencyUnavailable 503 dependency_unavailable
    ├── ShuttingDown          503 shutting_down (the --grace period ran out before the answer)
    └── UpstreamTimeout       504 upstream_timeout

The `reason` goes into the JSON body (`error`), the audit line and the metrics. Descriptions are
written by us, never copied from the credential.
"""

from __future__ import annotations

import json


class Refusal(Exception):
    status = 400
    reason = "invalid_request"
    bearer_challenge = False

    def __init__(self, description: str = "", *, reason: str | None = None, detail: str = "") -> None:
        super().__init__(description)
        self.description = description
        if reason is not None:
            self.reason = reason
        # `detail` is for the audit line only (e.g. which check failed); never sent to the caller.
        self.detail = detail

    def body(self) -> bytes:
        return json.dumps({"error": self.reason, "error_description": self.description}).encode()

    def headers(self, body: bytes = b"") -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store"),
                   (b"content-length", str(len(body)).encode())]
        if self.bearer_challenge:
            challenge = f'Bearer realm="sidecar", error="{self.reason}"'
            if self.reason == "missing_credentials":
                challenge = 'Bearer realm="sidecar"'
            headers.append((b"www-authenticate", challenge.encode()))
        return headers


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


class UpstreamUnavailable(Refusal):
    status = 502
    reason = "upstream_unavailable"


class DependencyUnavailable(Refusal):
    status = 503
    reason = "dependency_unavailable"


class ShuttingDown(Refusal):
    status = 503
    reason = "shutting_down"


class UpstreamTimeout(Refusal):
    status = 504
    reason = "upstream_timeout"
