"""What the upstream receives (SPEC §4), as pure functions: headers, query and body with every credential
removed, client-sent identity headers removed, and the sidecar's identity headers set."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote_plus

from sidecar.config.types import Source
from sidecar.proxy.transports.base import HOP_BY_HOP

if TYPE_CHECKING:
    from sidecar.authn.base import Identity
    from sidecar.proxy.request_view import Headers, RequestView

# Never sent upstream: the hop-by-hop fields, credentials meant for a proxy (the sidecar is none), and what the
# sidecar's own server already handled: `expect` is answered by it (100-continue), HTTP/2 upgrades are not made.
NOT_FORWARDED = HOP_BY_HOP | {b"proxy-authenticate", b"proxy-authorization", b"expect", b"http2-settings"}
# The forwarding family (normalised names): what proxies tell the backend about the client and the URL it used.
# Backends believe these (X-Forwarded-Prefix rewrites links, -Port and -Scheme build redirects, X-Real-IP is the
# client), so none comes from a client: only a trusted proxy's copies pass, and only in the spelling a proxy writes.
FORWARDING_PREFIX = b"x-forwarded"
FORWARDING_NAMES = frozenset({b"forwarded", b"x-real-ip"})


def normalised_name(name: bytes) -> bytes:
    """Header names as backends see them: CGI-style servers read `_` and `.` as `-` (CVE-2025-64484)."""
    return name.lower().replace(b"_", b"-").replace(b".", b"-")


@dataclass(frozen=True, slots=True)
class StripPlan:
    """Everything a route's authenticators read, computed once per route at load."""

    headers: frozenset[bytes]
    query: frozenset[str]
    cookies: frozenset[str]
    body_fields: frozenset[str]

    @classmethod
    def from_sources(cls, sources: Iterable[Source]) -> StripPlan:
        sources = list(sources)
        return cls(
            headers=frozenset(s.name.lower().encode("latin-1") for s in sources if s.kind == "header"),
            query=frozenset(s.name for s in sources if s.kind == "query"),
            cookies=frozenset(s.name for s in sources if s.kind == "cookie"),
            body_fields=frozenset(s.name for s in sources if s.kind in ("form", "body")),
        )


# What to do with an incoming header. PASS: the client's own, forwarded unless Connection names it. DROP: never
# forwarded. FORWARDING: a trusted proxy's (kept only from one). FORWARDED_*: read to build the sidecar's own value.
PASS, DROP, FORWARDING, FORWARDED_FOR, FORWARDED_PROTO, FORWARDED_HOST = range(6)


class IdentityHeaders:
    """The identity header names for one prefix (`X-Auth-` by default), and what to do with each incoming header
    name (classified once per distinct name, then looked up)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = normalised_name(prefix.encode("latin-1"))
        self._classes: dict[bytes, int] = {}
        p = prefix
        self.subject = f"{p}Subject".encode()
        self.client = f"{p}Client".encode()
        self.method = f"{p}Method".encode()
        self.scopes = f"{p}Scopes".encode()
        self.token = f"{p}Token".encode()
        self.cert_subject = f"{p}Client-Cert-Subject".encode()
        self.cert_sha256 = f"{p}Client-Cert-Sha256".encode()
        self._encoded: dict[int, tuple[Identity, Headers]] = {}

    def classify(self, name: bytes) -> int:
        kind = self._classes.get(name)
        if kind is None:
            kind = self._classify(name)
            if len(self._classes) < 4096:  # names are few in practice; a flood of new ones is just not cached
                self._classes[name] = kind
        return kind

    def _classify(self, name: bytes) -> int:
        if name in NOT_FORWARDED:
            return DROP
        norm = normalised_name(name)
        if norm.startswith(self.prefix) or norm == b"x-request-id":
            return DROP
        if not (norm.startswith(FORWARDING_PREFIX) or norm in FORWARDING_NAMES):
            return PASS
        # Only the spelling a proxy writes is a proxy's: a lookalike such as X_Forwarded_For is the client's, passed
        # on untouched by a proxy that set the real one, and a backend reading it would see another client.
        if name != norm:
            return DROP
        if name == b"x-forwarded-for":
            return FORWARDED_FOR
        if name == b"x-forwarded-proto":
            return FORWARDED_PROTO
        if name == b"x-forwarded-host":
            return FORWARDED_HOST
        return FORWARDING

    def encoded(self, identity: Identity) -> Headers:
        """The identity headers, encoded once per cached identity object."""
        entry = self._encoded.get(id(identity))
        if entry is not None and entry[0] is identity:
            return entry[1]
        out: Headers = [(self.subject, _header_value(identity.subject))]
        if identity.client:
            out.append((self.client, _header_value(identity.client)))
        out.append((self.method, _header_value(identity.authenticator)))
        out.append((self.scopes, _header_value(" ".join(sorted(identity.scopes)))))
        # It holds the identities it encoded (claims and all) outside the verdict cache's byte budget: keep it small.
        if len(self._encoded) > 1_000:
            self._encoded.clear()
        self._encoded[id(identity)] = (identity, out)
        return out


def _header_value(value: str) -> bytes:
    """Identity values come from tokens: anything outside printable ASCII is percent-encoded, so a claim can
    never split a header (CR/LF) or smuggle bytes to the backend."""
    if value.isascii() and value.isprintable():
        return value.encode("ascii")
    return quote(value, safe="".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")).encode("ascii")


def build_headers(
    request: RequestView,
    identity: Identity | None,
    plan: StripPlan,
    names: IdentityHeaders,
    *,
    trusted_peer: bool,
    signed_token: str | None = None,
    body_length: int | None = None,
) -> Headers:
    """The upstream request's headers (SPEC §4). From a trusted peer the forwarding family passes and
    X-Forwarded-For is appended to; from any other peer it is removed and X-Forwarded-For/-Proto/-Host are set from
    what the sidecar saw. `Connection` removes only the client's own headers: the forwarded chain is read from the
    headers as received, so `Connection: X-Forwarded-For` cannot hide the client the sidecar authorised (Apache
    CVE-2022-31813), and nothing the sidecar sets or vouches for can be named away."""
    connection_named: set[bytes] = set()
    for key, value in request.headers:
        if key == b"connection":
            connection_named.update(t.strip().lower().encode("latin-1") for t in value.decode("latin-1").split(","))
    connection_named.discard(b"host")  # the Host the sidecar validated and matched is the one the backend sees
    strip = plan.headers
    out: Headers = []
    forwarded_for: list[bytes] = []
    forwarded_proto = forwarded_host = None
    host = b""
    classify = names.classify
    for key, value in request.headers:
        if key == b"host":
            host = value
        kind = classify(key)
        if kind == PASS:
            if key in strip or key in connection_named:
                continue
            if key == b"cookie" and plan.cookies:
                value = strip_cookies(value, plan.cookies)
                if not value:
                    continue
            elif key == b"content-length" and body_length is not None:
                continue
            out.append((key, value))
        elif kind != DROP and trusted_peer and key not in strip:
            if kind == FORWARDING:
                out.append((key, value))
            elif kind == FORWARDED_FOR:
                forwarded_for.append(value)
            elif kind == FORWARDED_PROTO:
                forwarded_proto = value
            else:
                forwarded_host = value
    if body_length is not None:
        out.append((b"content-length", str(body_length).encode()))
    peer = request.peer_ip.encode()
    out.append((b"x-forwarded-for", b", ".join([*forwarded_for, peer]) if forwarded_for else peer))
    out.append((b"x-forwarded-proto", forwarded_proto or request.scheme.encode()))
    out.append((b"x-forwarded-host", forwarded_host or host))
    out.append((b"x-request-id", request.request_id.encode()))
    if identity is not None:
        add_identity(out, names, identity, signed_token)
    cert = request.client_cert
    if cert is not None:  # the client-sent copies were dropped above with the rest of the identity prefix
        out.append((names.cert_subject, _header_value(cert.subject)))
        out.append((names.cert_sha256, cert.sha256.encode()))
    return out


def add_identity(out: Headers, names: IdentityHeaders, identity: Identity, signed_token: str | None) -> None:
    """The identity headers (and the signed identity token when configured): to the upstream in proxy mode, to the
    data plane in decision mode (sidecar/proxy/decision.py)."""
    out.extend(names.encoded(identity))
    if signed_token:
        out.append((names.token, signed_token.encode()))


def client_identity_headers(headers: Headers, names: IdentityHeaders) -> list[bytes]:
    """The names of client-sent headers in the identity namespace (any spelling a backend reads as one)."""
    return [key for key, _ in headers if normalised_name(key).startswith(names.prefix)]


def strip_cookies(header: bytes, names: frozenset[str]) -> bytes:
    kept = []
    for part in header.split(b";"):
        name = part.split(b"=", 1)[0].strip().decode("latin-1")
        if name and name not in names:
            kept.append(part.strip())
    return b"; ".join(kept)


def strip_query(query_string: bytes, names: frozenset[str]) -> bytes:
    """Remove every copy of the named parameters; every other parameter passes byte for byte."""
    if not names or not query_string:
        return query_string
    kept = [
        part for part in query_string.split(b"&")
        if unquote_plus(part.split(b"=", 1)[0].decode("latin-1")) not in names
    ]
    return b"&".join(kept)


def strip_body(body: bytes, content_type: str, fields: frozenset[str]) -> bytes:
    """A form or JSON body without the named credential fields (the rest forwarded intact)."""
    if not fields or not body:
        return body
    if content_type == "application/x-www-form-urlencoded":
        return strip_query(body, fields)
    if content_type.endswith("json"):
        try:
            data = json.loads(body)
        except ValueError:
            return body
        if isinstance(data, dict) and fields & data.keys():
            return json.dumps({k: v for k, v in data.items() if k not in fields}, ensure_ascii=False).encode()
    return body


def target(base_path: str, path: str, query: bytes) -> bytes:
    """The upstream request target: the configured base path, then the normalised path (never a client-built
    URL: a path like `//evil/x` joined onto a base URL would name another host)."""
    raw = (base_path + path).encode("ascii")
    return raw + b"?" + query if query else raw
