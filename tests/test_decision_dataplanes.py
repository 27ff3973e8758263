"""Decision mode behind real data planes (SPEC §11): the Debian nginx and caddy binaries, started by the test on
loopback with the recipes under examples/ (ports substituted), in front of the recording upstream, asking a real
sidecar's decision listener. What the client gets and what the upstream receives is asserted."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import bearer, config_text, mint, raw_request
from test_decision import decision_config

from bench.nginx import Nginx, _common, _http_common
from bench.procs import stop, tail
from sidecar.testing import KeyPair, RecordingUpstream, RunningSidecar, free_port, running_sidecar

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _port(url: str | None) -> int:
    assert url is not None
    return int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def sidecar(shared_upstream: RecordingUpstream, idp_keys: KeyPair) -> Iterator[RunningSidecar]:
    with running_sidecar(config_text(decision_config(shared_upstream.url, idp_keys)), decision=True) as sc:
        yield sc


def nginx_recipe(decision_port: int, upstream_port: int, port: int) -> str:
    """examples/nginx/sidecar.conf with this test's ports."""
    text = (EXAMPLES / "nginx" / "sidecar.conf").read_text()
    text = text.replace("127.0.0.1:9100", f"127.0.0.1:{decision_port}")
    text = text.replace("127.0.0.1:8000", f"127.0.0.1:{upstream_port}")
    return re.sub(r"listen 80;", f"listen 127.0.0.1:{port};", text)


@pytest.fixture(scope="module")
def nginx(sidecar: RunningSidecar, shared_upstream: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[str]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix = tmp_path_factory.mktemp("nginx")
    prefix.chmod(0o755)
    port, ready = free_port(), free_port()
    recipe = nginx_recipe(_port(sidecar.decision_url), _port(shared_upstream.url), port)
    conf = (_common(prefix) + "http {\n" + _http_common(prefix) + recipe
            + f"\nserver {{ listen 127.0.0.1:{ready}; location = /ready {{ return 200; }} }}\n}}\n")
    server = Nginx(binary, prefix, conf, ready, "decision-recipe")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


def test_nginx_forwards_an_accepted_jwt_with_identity_and_without_credentials(
    nginx: str, upstream: RecordingUpstream, idp_keys: KeyPair,
) -> None:
    """Through nginx: an accepted JWT reaches the upstream with identity headers, no Authorization, no access_token."""
    token = mint(idp_keys, sub="alice", scope="read write")
    header = httpx.get(nginx + "/api/orders/42?b=2", headers=bearer(token), trust_env=False)
    query = httpx.get(nginx + f"/api/orders/43?a=1&access_token={token}&b=2", trust_env=False)

    assert (header.status_code, query.status_code) == (200, 200)
    first, second = upstream.received
    assert (first.path, first.query) == ("/api/orders/42", "b=2")
    assert (second.path, second.query) == ("/api/orders/43", "a=1&b=2")
    for got in (first, second):
        assert got.header("x-auth-subject") == "alice"
        assert got.header("x-auth-method") == "partner_jwt"
        assert got.header("x-auth-scopes") == "read write"
        assert got.header("x-auth-client") is None
        assert "authorization" not in got.header_names()
        assert got.header("x-request-id")


def test_nginx_refusals_reach_the_client(nginx: str, upstream: RecordingUpstream, idp_keys: KeyPair) -> None:
    """Through nginx: no credential → 401 with WWW-Authenticate; missing scope → 403; no route → 403; none forwarded."""
    missing = httpx.get(nginx + "/api/x", trust_env=False)
    scoped = httpx.get(nginx + "/scoped/x", headers=bearer(mint(idp_keys)), trust_env=False)
    nowhere = httpx.get(nginx + "/nowhere", headers=bearer(mint(idp_keys)), trust_env=False)

    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="sidecar"'
    assert missing.headers["x-auth-reason"] == "missing_credentials"
    assert (scoped.status_code, scoped.headers["x-auth-reason"]) == (403, "insufficient_scope")
    assert (nowhere.status_code, nowhere.headers["x-auth-status"]) == (403, "404")
    assert upstream.received == []


def test_nginx_client_identity_headers_never_reach_the_upstream(
    nginx: str, upstream: RecordingUpstream, idp_keys: KeyPair,
) -> None:
    """Through nginx: a client-sent X-Auth-Subject (and lookalike spelling) never reaches the upstream."""
    forged = {"X-Auth-Subject": "admin", "X-Auth-Client": "root", "X-Auth-Scopes": "admin"}
    public = raw_request(nginx, "/public/x", {**forged, "X_Auth_Subject": "admin"})
    signed = raw_request(nginx, "/api/x", {**forged, **bearer(mint(idp_keys, sub="bob"))})

    assert (public.status_code, signed.status_code) == (200, 200)
    anonymous, bob = upstream.received
    assert (anonymous.header("x-auth-subject"), bob.header("x-auth-subject")) == ("anonymous", "bob")
    for got in (anonymous, bob):
        assert got.header("x-auth-client") is None
        assert "x_auth_subject" not in got.header_names()
    assert (anonymous.header("x-auth-scopes"), bob.header("x-auth-scopes")) == (None, "read")


def test_nginx_removes_a_credential_cookie(nginx: str, upstream: RecordingUpstream, idp_keys: KeyPair) -> None:
    """Through nginx: a cookie credential is accepted and the upstream gets the other cookies only."""
    cookies = raw_request(nginx, "/app/home", {"Cookie": f"theme=dark; session={mint(idp_keys, sub='dee')}; lang=en"})
    plain = raw_request(nginx, "/public/x", {"Cookie": "theme=light"})

    assert (cookies.status_code, plain.status_code) == (200, 200)
    with_session, without = upstream.received
    assert with_session.header("x-auth-subject") == "dee"
    assert with_session.header("cookie") == "theme=dark; lang=en"
    assert without.header("cookie") == "theme=light"


@pytest.mark.parametrize("target", ["/public/..%2fapi/x", "/public/..;/api/x", "/public/%2e%2e%2fapi/x",
                                    "/public/..%5capi/x"])
def test_nginx_path_tricks_are_refused(nginx: str, upstream: RecordingUpstream, target: str) -> None:
    """Through nginx: a path the backend may read differently is refused (403, X-Auth-Status 400), never allowed."""
    response = raw_request(nginx, target)

    assert response.status_code == 403
    assert response.headers["x-auth-status"] == "400"
    assert upstream.received == []


# -- Caddy forward_auth ----------------------------------------------------------------------------------------


def caddy_recipe(decision_port: int, upstream_port: int, port: int) -> str:
    """examples/caddy/Caddyfile with this test's ports."""
    text = (EXAMPLES / "caddy" / "Caddyfile").read_text()
    text = text.replace("127.0.0.1:9100", f"127.0.0.1:{decision_port}")
    text = text.replace("127.0.0.1:8000", f"127.0.0.1:{upstream_port}")
    return text.replace("http://app.example", f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def caddy(sidecar: RunningSidecar, shared_upstream: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[str]:
    binary = shutil.which("caddy") or "/usr/bin/caddy"
    directory = tmp_path_factory.mktemp("caddy")
    port = free_port()
    admin = free_port()
    caddyfile = directory / "Caddyfile"
    caddyfile.write_text(f"{{\n\tadmin 127.0.0.1:{admin}\n\tauto_https off\n}}\n\n"
                         + caddy_recipe(_port(sidecar.decision_url), _port(shared_upstream.url), port))
    log = open(directory / "caddy.log", "wb")
    env = {"HOME": str(directory), "XDG_DATA_HOME": str(directory), "XDG_CONFIG_HOME": str(directory),
           "PATH": "/usr/bin:/bin"}
    process = subprocess.Popen([binary, "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
                               stdout=log, stderr=log, env=env, start_new_session=True)
    log.close()
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"caddy exited:\n{tail(directory / 'caddy.log')}")
            try:
                httpx.get(f"http://127.0.0.1:{port}/public/ready", trust_env=False)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"caddy not ready:\n{tail(directory / 'caddy.log')}") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process, "caddy")


def test_caddy_forwards_an_accepted_jwt_with_identity_and_without_credentials(
    caddy: str, upstream: RecordingUpstream, idp_keys: KeyPair,
) -> None:
    """Through Caddy: an accepted JWT reaches the upstream on the authorised path with identity headers and no
    Authorization (Caddy 2.6 cannot remove one query parameter: the README says to use header credentials there)."""
    upstream.received.clear()
    token = mint(idp_keys, sub="alice", scope="read write")
    response = raw_request(caddy, "/api/orders/./42?b=2", bearer(token))

    assert response.status_code == 200, response.text
    [got] = upstream.received
    assert (got.path, got.query) == ("/api/orders/42", "b=2")
    assert got.header("x-auth-subject") == "alice"
    assert got.header("x-auth-method") == "partner_jwt"
    assert got.header("x-auth-scopes") == "read write"
    assert got.header("x-auth-client") == ""  # named and empty: no client (see the README's header contract)
    assert "authorization" not in got.header_names()
    assert not {"x-auth-upstream-path", "x-auth-upstream-uri"} & got.header_names()


def test_caddy_refusals_are_proxy_mode_replies(caddy: str, upstream: RecordingUpstream, idp_keys: KeyPair) -> None:
    """Through Caddy: 401 with WWW-Authenticate and the JSON body, 403 for a missing scope, 400 for path tricks."""
    upstream.received.clear()
    missing = httpx.get(caddy + "/api/x", trust_env=False)
    scoped = httpx.get(caddy + "/scoped/x", headers=bearer(mint(idp_keys)), trust_env=False)
    tricked = raw_request(caddy, "/public/..%2fapi/x")
    semicolon = raw_request(caddy, "/public/..;/api/x")

    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="sidecar"'
    assert missing.json()["error"] == "missing_credentials"
    assert (scoped.status_code, scoped.json()["error"]) == (403, "insufficient_scope")
    assert (tricked.status_code, semicolon.status_code) == (400, 400)
    assert upstream.received == []


def test_caddy_client_identity_headers_never_reach_the_upstream(
    caddy: str, upstream: RecordingUpstream, idp_keys: KeyPair,
) -> None:
    """Through Caddy: client-sent identity headers never reach the upstream (copy_headers replaces or removes them)."""
    upstream.received.clear()
    forged = {"X-Auth-Subject": "admin", "X-Auth-Client": "root", "X-Auth-Scopes": "admin"}
    public = raw_request(caddy, "/public/x", forged)
    signed = raw_request(caddy, "/api/x", {**forged, **bearer(mint(idp_keys, sub="bob"))})

    assert (public.status_code, signed.status_code) == (200, 200)
    anonymous, bob = upstream.received
    assert (anonymous.header("x-auth-subject"), bob.header("x-auth-subject")) == ("anonymous", "bob")
    for got in (anonymous, bob):
        assert got.header("x-auth-client") == ""
    assert (anonymous.header("x-auth-scopes"), bob.header("x-auth-scopes")) == ("", "read")
