"""A read-only view of one incoming request, built once by the gateway: normalised path, headers,
query, cookies, body fields and the client address as trusted through `trusted_proxies`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl

from sidecar.config.types import Source
from sidecar.ip_addresses import Network, ip_in
from sidecar.proxy.client_cert import ClientCert

Headers = list[tuple[bytes, bytes]]


def client_address(peer: str, forwarded_for: list[bytes], trusted: Sequence[Network]) -> str:
    """The client IP. `X-Forwarded-For` is believed only from a trusted peer, walked from the right, stopping
    at the first untrusted hop (as uvicorn's proxy_headers middleware): the rightmost untrusted address is the
    one no client could forge. From an untrusted peer the header changes nothing."""
    if not trusted or not ip_in(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.decode("latin-1").split(",") if hop.strip()]
    client = peer
    for hop in reversed(hops):
        client = hop
        if not ip_in(hop, trusted):
            break
    return client


def is_trusted_peer(peer: str, trusted: Sequence[Network]) -> bool:
    return bool(trusted) and ip_in(peer, trusted)


class RequestView:
    __slots__ = (
        "_cookies",
        "_form",
        "_json",
        "_query",
        "body",
        "client_cert",
        "client_ip",
        "headers",
        "host",
        "method",
        "path",
        "peer_ip",
        "query_string",
        "request_id",
        "scheme",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query_string: bytes,
        headers: Headers,
        host: str,
        scheme: str,
        peer_ip: str,
        client_ip: str,
        request_id: str,
    ) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.host = host
        self.scheme = scheme
        self.peer_ip = peer_ip
        self.client_ip = client_ip
        self.request_id = request_id
        self.body: bytes | None = None
        self.client_cert: ClientCert | None = None  # the TLS listener's verified client certificate, if any
        self._query: list[tuple[str, str]] | None = None
        self._cookies: list[tuple[str, str]] | None = None
        self._form: list[tuple[str, str]] | None = None
        self._json: Any = None

    def header_values(self, name: bytes) -> list[str]:
        return [value.decode("latin-1") for key, value in self.headers if key == name]

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    def query(self) -> list[tuple[str, str]]:
        if self._query is None:
            self._query = parse_qsl(self.query_string.decode("latin-1"), keep_blank_values=True)
        return self._query

    def cookies(self) -> list[tuple[str, str]]:
        if self._cookies is None:
            self._cookies = []
            for value in self.header_values(b"cookie"):
                self._cookies.extend(parse_cookie_header(value))
        return self._cookies

    def content_type(self) -> str:
        return (self.header(b"content-type") or "").split(";", 1)[0].strip().lower()

    def form(self) -> list[tuple[str, str]]:
        if self._form is None:
            self._form = []
            if self.body is not None and self.content_type() == "application/x-www-form-urlencoded":
                self._form = parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True)
        return self._form

    def json(self) -> Any:
        if self._json is None and self.body is not None and self.content_type().endswith("json"):
            try:
                self._json = json.loads(self.body)
            except ValueError:
                self._json = {}
        return self._json if self._json is not None else {}

    def body_field(self, name: str) -> list[str]:
        """A top-level field of a JSON body, or of a form body."""
        if self.content_type() == "application/x-www-form-urlencoded":
            return [v for k, v in self.form() if k == name]
        data = self.json()
        if isinstance(data, dict) and name in data and data[name] is not None:
            value = data[name]
            if isinstance(value, dict | list):
                return [json.dumps(value)]
            return [value if isinstance(value, str) else str(value)]
        return []

    def values(self, source: Source) -> list[str]:
        kind, name = source.kind, source.name
        if kind == "header":
            return self.header_values(name.encode("latin-1"))
        if kind == "query":
            return [v for k, v in self.query() if k == name]
        if kind == "cookie":
            return [v for k, v in self.cookies() if k == name]
        if kind == "form":
            return [v for k, v in self.form() if k == name]
        return self.body_field(name)


def parse_cookie_header(value: str) -> list[tuple[str, str]]:
    """Cookie pairs in order, duplicates kept (RFC 6265 §5.4 lets a browser send two cookies of one name)."""
    pairs = []
    for part in value.split(";"):
        name, sep, val = part.strip().partition("=")
        if not sep or not name:
            continue
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1]
        pairs.append((name.strip(), val))
    return pairs


__all__ = ["Headers", "RequestView", "client_address", "is_trusted_peer", "parse_cookie_header"]
