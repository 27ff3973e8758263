"""CORS per route (SPEC §12): preflights answered 204 by the sidecar and never forwarded, actual answers and
refusals carrying the route's CORS headers, origins matched exactly or by one wildcard label."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import bearer, config_text, error_body, jwt_authenticator, make_config, mint, route
from test_config_check import error_lines, line_of, run_check

from sidecar.testing import KeyPair, RecordingUpstream, RunningSidecar, running_sidecar

PORTAL = "https://portal.example"
CORS = {"allow_origins": [PORTAL, "https://*.example.com"], "allow_headers": ["Authorization", "X-Trace"],
        "expose_headers": ["X-Request-Id", "X-Total"], "allow_credentials": True, "max_age": "10m"}


@pytest.fixture(scope="module")
def sidecar(shared_upstream: RecordingUpstream, idp_keys: KeyPair) -> Iterator[RunningSidecar]:
    text = config_text(make_config(shared_upstream.url, {"partner_jwt": jwt_authenticator(idp_keys)}, [
        route("api", "/api/**", ["partner_jwt"], cors=CORS, match={"path": "/api/**", "methods": ["GET", "POST"]}),
        route("public", "/public/**", ["partner_jwt"], cors={"allow_origins": ["*"]}),
        route("plain", "/plain/**", ["partner_jwt"]),
    ]))
    with running_sidecar(text) as sc:
        yield sc


def _preflight(url: str, origin: str, method: str = "POST", **extra: str) -> httpx.Response:
    headers = {"Origin": origin, "Access-Control-Request-Method": method, **extra}
    return httpx.request("OPTIONS", url, headers=headers, trust_env=False)


def test_preflight_from_an_allowed_origin_is_answered_by_the_sidecar(
    sidecar: RunningSidecar, upstream: RecordingUpstream,
) -> None:
    """A preflight from a listed origin: 204 with the route's CORS headers, no credential asked, nothing forwarded."""
    response = _preflight(sidecar.url + "/api/orders", PORTAL, "POST", **{"Access-Control-Request-Headers": "x-trace"})

    assert response.status_code == 204
    assert response.content == b""
    assert response.headers["access-control-allow-origin"] == PORTAL
    assert response.headers["access-control-allow-methods"] == "GET, POST"
    assert response.headers["access-control-allow-headers"] == "Authorization, X-Trace"
    assert response.headers["access-control-allow-credentials"] == "true"
    assert response.headers["access-control-max-age"] == "600"
    assert response.headers["vary"] == "Origin"
    assert upstream.received == []


@pytest.mark.parametrize(("origin", "allowed"), [
    ("https://a.example.com", True),
    ("https://A.Example.COM", True),
    ("https://a.b.example.com", False),  # one label only
    ("https://example.com", False),
    ("http://a.example.com", False),  # the scheme must match
    ("https://a.example.com:8443", False),  # so must the port
    ("https://evil-example.com", False),
    ("https://a.example.com.evil.test", False),
    ("https://portal.example.evil.test", False),
    ("http://portal.example", False),
    ("null", False),
])
def test_preflight_origin_matching(
    sidecar: RunningSidecar, upstream: RecordingUpstream, origin: str, allowed: bool,
) -> None:
    """Listed origins match exactly; `https://*.example.com` matches one more label, same scheme and port."""
    response = _preflight(sidecar.url + "/api/orders", origin)

    assert response.status_code == 204
    assert response.headers.get("access-control-allow-origin") == (origin if allowed else None)
    assert ("access-control-allow-methods" in response.headers) is allowed
    assert upstream.received == []


def test_preflight_for_a_method_not_allowed_gets_no_cors_headers(sidecar: RunningSidecar) -> None:
    """A preflight asking for a method outside allow_methods: no Access-Control-Allow-Origin (the browser stops);
    one for a method the route does not match is no route at all."""
    response = _preflight(sidecar.url + "/public/x", PORTAL, "DELETE")
    unrouted = _preflight(sidecar.url + "/api/orders", PORTAL, "DELETE")

    assert response.status_code == 204
    assert "access-control-allow-origin" not in response.headers
    error_body(unrouted, 404, "no_route")
    assert "access-control-allow-origin" not in unrouted.headers


def test_actual_request_carries_origin_and_vary(
    sidecar: RunningSidecar, upstream: RecordingUpstream, idp_keys: KeyPair,
) -> None:
    """An allowed request: the upstream's reply with Allow-Origin echoed, Vary: Origin, credentials and exposes."""
    response = httpx.get(sidecar.url + "/api/orders", headers={"Origin": PORTAL, **bearer(mint(idp_keys))},
                         trust_env=False)

    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == PORTAL
    assert response.headers["access-control-allow-credentials"] == "true"
    assert response.headers["access-control-expose-headers"] == "X-Request-Id, X-Total"
    assert "Origin" in response.headers.get_list("vary")
    assert len(upstream.received) == 1


def test_actual_request_from_another_origin_gets_only_vary(sidecar: RunningSidecar, idp_keys: KeyPair) -> None:
    """An origin not listed: the reply passes (the browser hides it) with Vary: Origin and no CORS grant."""
    response = httpx.get(sidecar.url + "/api/orders", headers={"Origin": "https://evil.test", **bearer(mint(idp_keys))},
                         trust_env=False)

    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-credentials" not in response.headers
    assert "Origin" in response.headers.get_list("vary")


def test_refusal_carries_cors_headers(sidecar: RunningSidecar, upstream: RecordingUpstream) -> None:
    """A 401 on a CORS route carries Allow-Origin, so the page can read the JSON error."""
    response = httpx.get(sidecar.url + "/api/orders", headers={"Origin": PORTAL}, trust_env=False)

    error_body(response, 401, "missing_credentials")
    assert response.headers["access-control-allow-origin"] == PORTAL
    assert response.headers["vary"] == "Origin"
    assert upstream.received == []


def test_any_origin_without_credentials_is_a_star(sidecar: RunningSidecar) -> None:
    """`allow_origins: ["*"]` answers `*`, and GET, HEAD, POST by default."""
    response = _preflight(sidecar.url + "/public/x", "https://anyone.test", "GET")

    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.headers["access-control-allow-methods"] == "GET, HEAD, POST"
    assert "access-control-allow-credentials" not in response.headers


def test_preflight_on_a_route_without_cors_is_handled_as_before(sidecar: RunningSidecar) -> None:
    """A route without `cors`: the preflight is an ordinary OPTIONS request (401 here), with no CORS header."""
    response = _preflight(sidecar.url + "/plain/x", PORTAL, "GET")

    error_body(response, 401, "missing_credentials")
    assert not [name for name in response.headers if name.startswith("access-control-")]


def test_check_refuses_any_origin_with_credentials(tmp_path: Path) -> None:
    """`sidecar check`: allow_origins ["*"] with allow_credentials true is an error at its line, with the fix."""
    text = ("version: 1\nupstream: http://127.0.0.1:9\nauthenticators:\n  open: {type: anonymous}\nroutes:\n"
            "  - id: api\n    match: {path: /api/**}\n    auth: [open]\n    cors:\n"
            "      allow_origins: ['*']\n      allow_credentials: true\n")
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)

    result = run_check(path)

    assert result.returncode == 1, result.stdout
    [(line, place, message)] = error_lines(path, result.stdout + result.stderr)
    assert line == line_of(text, "cors:")
    assert place == "routes[0].cors"
    assert "allow_credentials" in message and "list the origins" in message


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
