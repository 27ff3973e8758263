"""sidecar/proxy/routing.py in process: path normalisation, glob patterns and the route table, as tables
(the end-to-end behaviour is in tests/test_paths.py)."""

from __future__ import annotations

import re

import pytest

from sidecar.config.model import RouteConfig
from sidecar.errors import BadRequest
from sidecar.proxy.routing import RouteTable, glob_to_regex, matching_path, normalise_path, shadowed_routes


@pytest.mark.parametrize(("raw", "expected"), [
    (b"/", "/"),
    (b"/api/v1/users", "/api/v1/users"),
    (b"/api/v1/users/", "/api/v1/users/"),
    (b"/api//v1", "/api/v1"),
    (b"/api/./v1", "/api/v1"),
    (b"/api/x/../v1", "/api/v1"),
    (b"/api/v1/..", "/api/"),
    (b"/%61pi/v1", "/api/v1"),            # an unreserved character's escape is decoded
    (b"/api/%7euser", "/api/~user"),
    (b"/api/a%3ab", "/api/a%3Ab"),       # a reserved character's escape is kept, upper-cased
    (b"/api/caf\xc3\xa9", "/api/caf%C3%A9"),  # raw non-ASCII bytes are percent-encoded
    (b"/api/a b", "/api/a%20b"),
    (b"/api/%2e%2e/admin", "/admin"),       # encoded dot-segments are dot-segments
    (b"/api;v=1/x", "/api;v=1/x"),          # path parameters stay in the path sent upstream
])
def test_normalise_path(raw: bytes, expected: str) -> None:
    """Each raw path normalises to one canonical form."""
    assert normalise_path(raw) == expected


@pytest.mark.parametrize("raw", [
    b"api/v1",               # not absolute
    b"/api/%2F/admin",       # encoded slash
    b"/api/%5cadmin",        # encoded backslash
    b"/api/%00",             # encoded NUL
    b"/api\\admin",          # raw backslash
    b"/api/%zz",             # malformed escape
    b"/api/%4",              # truncated escape
    b"/..",                  # above the root
    b"/api/../../etc",
    b"/api/..;/admin",       # Tomcat's dot-segment with a path parameter
    b"/api/.;x/admin",
])
def test_normalise_path_refuses(raw: bytes) -> None:
    """Paths whose structure an escape or a dot-segment would change are refused (400)."""
    with pytest.raises(BadRequest):
        normalise_path(raw)


@pytest.mark.parametrize(("path", "expected"), [
    ("/api/v1", "/api/v1"),
    ("/admin;x=1/secret", "/admin/secret"),
    ("/a;b/c;d/e", "/a/c/e"),
])
def test_matching_path_drops_path_parameters(path: str, expected: str) -> None:
    """Routes match the path servlet containers route on: `;params` removed from every segment."""
    assert matching_path(path) == expected


@pytest.mark.parametrize(("pattern", "path", "matches"), [
    ("/", "/", True),
    ("/", "/x", False),
    ("/api/*", "/api/users", True),
    ("/api/*", "/api/users/1", False),
    ("/api/*", "/api", False),
    ("/api/**", "/api", True),
    ("/api/**", "/api/", True),
    ("/api/**", "/api/users/1", True),
    ("/api/**", "/apix", False),
    ("/api/*.json", "/api/users.json", True),
    ("/api/*.json", "/api/users.xml", False),
    ("/api/v1.2/*", "/api/v1x2/a", False),   # a dot in a glob matched any character once
    ("/x/*.css", "/x/acss", False),
    ("/x/*.css", "/x/a.css", True),
    ("/a+b/(x)", "/a+b/(x)", True),          # regex characters in a glob are literal
    ("/**/health", "/a/b/health", True),
    ("/**/health", "/health", True),
])
def test_glob_patterns(pattern: str, path: str, matches: bool) -> None:
    """`*` is one segment or part of one, `**` any number of segments (none included)."""
    assert bool(re.match(glob_to_regex(pattern), path)) is matches


def route(route_id: str, path: str | None = None, methods: list[str] | None = None, host: str | None = None,
          path_regex: str | None = None) -> RouteConfig:
    match = {"path": path, "methods": methods, "host": host, "path_regex": path_regex}
    return RouteConfig.model_validate({"id": route_id, "auth": ["a"],
                                       "match": {k: v for k, v in match.items() if v is not None}})


TABLE = [
    route("login", "/api/login", methods=["POST"]),
    route("api-get", "/api/**", methods=["GET"]),
    route("admin-host", "/**", host="admin.example"),
    route("tenant", "/t/*/items", host="*.tenants.example"),
    route("regex", path_regex=r"^/v[0-9]+/status$"),
    route("fallback", "/**"),
]


@pytest.mark.parametrize(("method", "host", "path", "expected"), [
    ("POST", "app.example", "/api/login", "login"),
    ("GET", "app.example", "/api/login", "api-get"),        # first match in file order wins
    ("GET", "app.example", "/api/users/1", "api-get"),
    ("DELETE", "app.example", "/api/users/1", "fallback"),
    ("GET", "admin.example", "/api/users", "api-get"),
    ("GET", "admin.example", "/other", "admin-host"),
    ("GET", "a.tenants.example", "/t/7/items", "tenant"),
    ("GET", "a.b.tenants.example", "/t/7/items", "fallback"),  # `*` in a host is one label
    ("GET", "app.example", "/v2/status", "regex"),
    ("GET", "app.example", "/v2/status/x", "fallback"),
    ("GET", "app.example", "/api;x=1/users", "api-get"),      # matched without path parameters
])
def test_route_table_first_match_wins(method: str, host: str, path: str, expected: str) -> None:
    """The table picks the first route, in file order, matching method, host and path."""
    found = RouteTable(TABLE).match(method, host, path)
    assert found is not None and found.id == expected


def test_route_table_without_a_match_is_none() -> None:
    """A request no route matches finds none (the gateway answers 404)."""
    table = RouteTable([route("api", "/api/**")])
    assert table.match("GET", "h", "/other") is None
    assert table.match("GET", "h", "/other") is None  # the remembered miss too


@pytest.mark.parametrize(("routes", "expected"), [
    ([route("all", "/**"), route("api", "/api/**")], [(0, 1)]),
    ([route("api", "/api/**"), route("all", "/**")], []),
    ([route("get", "/api/**", methods=["GET"]), route("any", "/api/x")], []),
    ([route("any", "/api/*"), route("get", "/api/x", methods=["GET"])], [(0, 1)]),
    ([route("host", "/**", host="a.example"), route("api", "/api/**")], []),
])
def test_shadowed_routes(routes: list[RouteConfig], expected: list[tuple[int, int]]) -> None:
    """A later route an earlier one always matches first is reported (for `sidecar check`)."""
    assert list(shadowed_routes(routes)) == expected
