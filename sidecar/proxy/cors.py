"""CORS for a route (Fetch standard §3.2, "CORS protocol"): a route's `cors:` compiled once into a `Cors`.

A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) for a route with `cors` is answered by
the sidecar itself — 204, without authentication, since browsers send preflights without credentials (Fetch
§3.2.2) — and never forwarded. Every other answer on such a route (the upstream's, and the sidecar's own 401/403,
so the page can read why it was refused) carries `Access-Control-Allow-Origin` when the request's origin is
allowed, and always `Vary: Origin` (the answer depends on it: a shared cache must not serve one origin's answer to
another). An origin not allowed gets no CORS header at all: the browser then keeps the answer from the page.

Origins are compared as browsers serialise them (RFC 6454 §6.2: lower-case scheme and host, the port only when
not the default). `https://*.example.com` matches exactly one more DNS label (`https://a.example.com`, not
`https://a.b.example.com`, not `https://example.com`, not `http://a.example.com`): a broader wildcard would let
any sub-sub-domain a tenant controls read the replies."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.config.model import CorsConfig, RouteConfig
    from sidecar.proxy.request_view import RequestView

Headers = list[tuple[bytes, bytes]]

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # one DNS label (RFC 1123 §2.1)
_SAFELISTED_METHODS = ["GET", "HEAD", "POST"]  # Fetch §2.2.1: what a browser sends without a preflight
_VARY = (b"vary", b"Origin")


class Cors:
    """One route's CORS settings, with every header value it sends already encoded."""

    __slots__ = ("any_origin", "credentials", "exact", "methods", "preflight_headers", "response_headers",
                 "suffixes")

    def __init__(self, config: CorsConfig, route_methods: list[str] | None) -> None:
        self.any_origin = config.allow_origins == ["*"]
        self.exact = frozenset(o for o in config.allow_origins if "://*." not in o)
        # `https://*.example.com` → ("https://", ".example.com"): the origin is prefix + one label + suffix.
        self.suffixes = tuple((o.split("*", 1)[0], o.split("*", 1)[1]) for o in config.allow_origins if "://*." in o)
        self.credentials = config.allow_credentials
        methods = config.allow_methods or route_methods or _SAFELISTED_METHODS
        self.methods = frozenset(methods)
        shared: Headers = [_VARY]
        if config.allow_credentials:
            shared.append((b"access-control-allow-credentials", b"true"))
        self.response_headers = list(shared)
        if config.expose_headers:
            self.response_headers.append((b"access-control-expose-headers", ", ".join(config.expose_headers).encode()))
        self.preflight_headers = [*shared, (b"access-control-allow-methods", ", ".join(methods).encode()),
                                  (b"access-control-max-age", b"%d" % int(config.max_age))]
        if config.allow_headers:
            self.preflight_headers.append((b"access-control-allow-headers", ", ".join(config.allow_headers).encode()))

    @classmethod
    def of(cls, route: RouteConfig) -> Cors | None:
        return None if route.cors is None else cls(route.cors, route.match.methods)

    def allows(self, origin: str) -> bool:
        origin = origin.lower()
        if self.any_origin or origin in self.exact:
            return True
        for prefix, suffix in self.suffixes:
            if origin.startswith(prefix) and origin.endswith(suffix):
                label = origin[len(prefix):len(origin) - len(suffix)]
                if _LABEL.fullmatch(label):
                    return True
        return False

    def allow_origin(self, origin: str | None) -> tuple[bytes, bytes] | None:
        """`Access-Control-Allow-Origin` for this request's origin, or None when it is not allowed. `*` is sent only
        without credentials (Fetch §3.2.5: a credentialed answer with `*` is refused by browsers anyway)."""
        if origin is None or not self.allows(origin):
            return None
        if self.any_origin and not self.credentials:
            return (b"access-control-allow-origin", b"*")
        return (b"access-control-allow-origin", origin.encode("latin-1"))

    def preflight(self, request: RequestView) -> Headers:
        """The headers of the 204 answering a preflight: the CORS ones only for an allowed origin asking for an
        allowed method; else `Vary: Origin` alone, and the browser stops there."""
        allowed = self.allow_origin(request.header(b"origin"))
        wanted = (request.header(b"access-control-request-method") or "").strip().upper()
        if allowed is None or wanted not in self.methods:
            return [_VARY]
        return [allowed, *self.preflight_headers]

    def add_to(self, headers: Headers, request: RequestView) -> None:
        """Set the CORS headers of an actual answer (the upstream's or a refusal): any the upstream sent are
        replaced, so the route's settings are the only ones a browser sees."""
        headers[:] = [h for h in headers if not h[0].lower().startswith(b"access-control-")]
        allowed = self.allow_origin(request.header(b"origin"))
        if allowed is not None:
            headers.append(allowed)
            headers.extend(self.response_headers)
        else:
            headers.append(_VARY)


def is_preflight(method: str, request_headers: list[tuple[bytes, bytes]]) -> str | None:
    """The method a CORS preflight asks about (its `Access-Control-Request-Method`), or None when this request is
    not a preflight (Fetch §3.2.2: OPTIONS with both Origin and Access-Control-Request-Method)."""
    if method != "OPTIONS":
        return None
    origin = wanted = None
    for key, value in request_headers:
        if key == b"origin":
            origin = value
        elif key == b"access-control-request-method":
            wanted = value
    if origin is None or wanted is None:
        return None
    return wanted.decode("latin-1").strip().upper() or None
