"""Path normalisation and the route table: first match in file order wins (SPEC §2).

Matching happens on the normalised path, and the upstream receives that same path, so the sidecar and the
backend can never disagree on which resource was asked for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from sidecar.errors import BadRequest

if TYPE_CHECKING:
    from sidecar.config.model import RouteConfig

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters that may stand unencoded in a path (RFC 3986 §3.3: pchar and "/"); others get percent-encoded.
_PATH_SAFE = _UNRESERVED | frozenset(b"!$&'()*+,;=:@/")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# Decoded to these, an escape would change the path's structure: refused (encoded slash, backslash, NUL).
_FORBIDDEN_DECODED = frozenset(b"/\\\x00")


# Paths that are already canonical: no escapes, no empty or dot-led segments, only safe characters. Most real
# requests; they skip the byte-by-byte pass below.
_CANONICAL = re.compile(rb"/|(?:/[A-Za-z0-9_~!$&'()*+,=:@-][A-Za-z0-9._~!$&'()*+,=:@-]*)+/?")


def normalise_path(raw_path: bytes) -> str:
    """The canonical form of a request path, or `BadRequest`.

    Percent-escapes of unreserved characters are decoded (RFC 3986 §6.2.2.2), others upper-cased; dot-segments
    are removed (§5.2.4); empty segments are merged. Refused: an encoded `/` or `\\`, a NUL, a raw backslash, a
    path climbing above the root, and `..;`-style segments that servlet containers read as dot-segments
    (the Tomcat path-parameter confusion behind many auth bypasses).
    """
    if _CANONICAL.fullmatch(raw_path):
        return raw_path.decode("ascii")
    if not raw_path.startswith(b"/"):
        raise BadRequest("the request target must be an absolute path")
    out = bytearray()
    i, n = 0, len(raw_path)
    while i < n:
        byte = raw_path[i]
        if byte == 0x25:  # %
            pair = raw_path[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in _HEX for c in pair):
                raise BadRequest("malformed percent-escape in the path")
            decoded = int(pair, 16)
            if decoded in _FORBIDDEN_DECODED:
                raise BadRequest("encoded slash, backslash or NUL in the path")
            if decoded in _UNRESERVED:
                out.append(decoded)
            else:
                out += b"%" + pair.upper()
            i += 3
            continue
        if byte == 0x5C or byte == 0:
            raise BadRequest("backslash or NUL in the path")
        if byte in _PATH_SAFE:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
        i += 1
    return _remove_dot_segments(out.decode("ascii"))


def _remove_dot_segments(path: str) -> str:
    segments = path.split("/")[1:]
    stack: list[str] = []
    trailing = False
    for segment in segments:
        trailing = False
        if segment in ("", "."):
            trailing = True
            continue
        if segment == "..":
            if not stack:
                raise BadRequest("the path climbs above the root")
            stack.pop()
            trailing = True
            continue
        if ";" in segment and segment.split(";", 1)[0] in ("", ".", ".."):
            raise BadRequest("path parameters on a dot-segment are not allowed")
        stack.append(segment)
    result = "/" + "/".join(stack)
    if trailing and stack:
        result += "/"
    return result


def matching_path(path: str) -> str:
    """The path routes are matched against: `;params` removed from every segment. Servlet containers drop them
    before routing (`/admin;x=1/secret` is `/admin/secret` to Tomcat), so the sidecar must match as they will;
    the upstream still receives the path as sent (normalised)."""
    if ";" not in path:
        return path
    return "/".join(segment.split(";", 1)[0] for segment in path.split("/"))


def glob_to_regex(pattern: str) -> str:
    """`*` is one segment (or part of one), `**` any number of segments, including none."""
    out = "^"
    for segment in pattern.split("/")[1:]:
        if segment == "**":
            out += "(?:/.*)?"
        else:
            out += "/" + re.escape(segment).replace(r"\*", "[^/]*")  # a dot is a dot: `/x/*.css` is not `/x/acss`
    return out + "$"


def _first_literal(pattern: str | None) -> str | None:
    if pattern is None:
        return None
    first = pattern.split("/")[1]
    return None if "*" in first else first


class CompiledRoute:
    __slots__ = ("config", "first_segment", "host", "host_regex", "id", "index", "methods", "path_regex")

    def __init__(self, index: int, config: RouteConfig) -> None:
        match = config.match
        self.index = index
        self.id = config.id
        self.config = config
        self.methods = frozenset(match.methods) if match.methods else None
        pattern = glob_to_regex(match.path) if match.path is not None else match.path_regex
        assert pattern is not None
        self.path_regex = re.compile(pattern)
        self.first_segment = _first_literal(match.path)
        host = (match.host or "").lower() or None
        self.host = host if host and "*" not in host else None
        self.host_regex = None
        if host and "*" in host:
            self.host_regex = re.compile("^" + re.escape(host).replace(r"\*", "[^.]+") + "$")

    def matches(self, method: str, host: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.host is not None and host != self.host:
            return False
        if self.host_regex is not None and not self.host_regex.match(host):
            return False
        return self.path_regex.match(path) is not None

    def why_not(self, method: str, host: str, path: str) -> str:
        if self.methods is not None and method not in self.methods:
            return f"method {method} not in {sorted(self.methods)}"
        if (self.host is not None and host != self.host) or (self.host_regex and not self.host_regex.match(host)):
            return f"host {host!r} does not match {self.config.match.host!r}"
        if not self.path_regex.match(path):
            return f"path {path!r} does not match {self.config.match.path or self.config.match.path_regex!r}"
        return "matches"


class RouteTable:
    """Routes indexed by their first literal path segment, so a lookup costs the same with 1 route or 1,000.
    Within a bucket the file order is kept; routes without a literal first segment are in every bucket."""

    _CACHE_LIMIT = 8192

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self.routes = [CompiledRoute(i, route) for i, route in enumerate(routes)]
        wildcard = [r for r in self.routes if r.first_segment is None]
        buckets: dict[str, list[CompiledRoute]] = {}
        for route in self.routes:
            if route.first_segment is not None:
                buckets.setdefault(route.first_segment, []).append(route)
        self._wildcard = wildcard
        self._buckets = {
            key: sorted(found + wildcard, key=lambda r: r.index) for key, found in buckets.items()
        }
        self._memo: dict[tuple[str, str, str], CompiledRoute | None] = {}

    def candidates(self, path: str) -> list[CompiledRoute]:
        first = path[1:].split("/", 1)[0]
        return self._buckets.get(first, self._wildcard)

    def match(self, method: str, host: str, path: str) -> CompiledRoute | None:
        key = (method, host, path)
        try:
            return self._memo[key]
        except KeyError:
            pass
        found = None
        path = matching_path(path)
        for route in self.candidates(path):
            if route.matches(method, host, path):
                found = route
                break
        if len(self._memo) >= self._CACHE_LIMIT:
            self._memo.clear()
        self._memo[key] = found
        return found


def shadowed_routes(routes: Sequence[RouteConfig]) -> Iterable[tuple[int, int]]:
    """Pairs (earlier, later) where the earlier route matches everything the later one can (a heuristic:
    exact for literal paths, by a sample path for globs)."""
    compiled = [CompiledRoute(i, r) for i, r in enumerate(routes)]
    for later in compiled:
        sample = _sample_path(later.config.match.path)
        if sample is None:
            continue
        for earlier in compiled[: later.index]:
            if _covers(earlier, later, sample):
                yield earlier.index, later.index
                break


def _sample_path(pattern: str | None) -> str | None:
    if pattern is None:
        return None
    return pattern.replace("**", "zz9/zz8").replace("*", "zz7")


def _covers(earlier: CompiledRoute, later: CompiledRoute, sample: str) -> bool:
    if earlier.methods is not None and (later.methods is None or not later.methods <= earlier.methods):
        return False
    if earlier.config.match.host and earlier.config.match.host != later.config.match.host:
        return False
    if not earlier.path_regex.match(sample):
        return False
    if "**" in (later.config.match.path or "") and not earlier.path_regex.match(sample.replace("zz9/zz8", "")):
        return False
    return True
