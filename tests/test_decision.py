"""Decision mode's three HTTP adapters driven with exactly what each data plane sends (SPEC §11): a real sidecar
with its decision listener on loopback, real RSA keys. The data planes themselves run in test_decision_dataplanes.py."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from conftest import bearer, config_text, error_body, jwt_authenticator, make_config, mint, raw_request, route, wait_for
from test_jwt_routes import _audit_lines, captured_audit

from sidecar.testing import KeyPair, RecordingUpstream, RunningSidecar, running_sidecar


def decision_config(upstream_url: str, keys: KeyPair) -> dict[str, object]:
    """The policy every decision-mode test runs: the same shape as the proxy tests' JWT policy."""
    return make_config(
        upstream_url,
        {"partner_jwt": jwt_authenticator(keys, **{"from": ["header:Authorization", "query:access_token"]}),
         "session": jwt_authenticator(keys, **{"from": ["cookie:session"]}),
         "public": {"type": "anonymous"}},
        [
            route("api", "/api/**", ["partner_jwt"]),
            route("scoped", "/scoped/**", ["partner_jwt"], require={"scopes": ["admin"]}),
            route("office", "/office/**", ["partner_jwt"], require={"ips": ["203.0.113.0/24"]}),
            route("app", "/app/**", ["session"]),
            route("public", "/public/**", ["public"]),
        ],
        trusted_proxies=["127.0.0.1/32"],
    )


@pytest.fixture(scope="module")
def sidecar(shared_upstream: RecordingUpstream, idp_keys: KeyPair) -> Iterator[RunningSidecar]:
    with running_sidecar(config_text(decision_config(shared_upstream.url, idp_keys)), decision=True) as sc:
        yield sc


def nginx_ask(sidecar: RunningSidecar, uri: str, headers: dict[str, str] | None = None, method: str = "GET",
              source: str = "127.0.0.1") -> httpx.Response:
    """An nginx auth_request subrequest: a GET to /nginx with the original request in X-Original-* headers."""
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), trust_env=False) as client:
        assert sidecar.decision_url is not None
        return client.get(sidecar.decision_url + "/nginx", headers={
            "X-Original-Method": method, "X-Original-URI": uri, "X-Original-Host": "app.example", **(headers or {})})


def traefik_ask(sidecar: RunningSidecar, uri: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """A Traefik ForwardAuth (or Caddy forward_auth) request: the original request in X-Forwarded-* headers."""
    assert sidecar.decision_url is not None
    return httpx.get(sidecar.decision_url + "/traefik", headers={
        "X-Forwarded-Method": "GET", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "app.example",
        "X-Forwarded-Uri": uri, "X-Forwarded-For": "198.51.100.7", **(headers or {})}, trust_env=False)


def test_nginx_allow_answers_identity_and_stripped_uri(sidecar: RunningSidecar, idp_keys: KeyPair,
                                                       upstream: RecordingUpstream) -> None:
    """/nginx allows an accepted JWT with the identity headers and X-Auth-Upstream-Uri without the credential."""
    token = mint(idp_keys, sub="alice", scope="read write")
    response = nginx_ask(sidecar, f"/api/orders/./42?b=2&access_token={token}&a=1")

    assert response.status_code == 200
    assert response.headers["x-auth-subject"] == "alice"
    assert response.headers["x-auth-method"] == "partner_jwt"
    assert response.headers["x-auth-scopes"] == "read write"
    assert response.headers["x-auth-upstream-uri"] == "/api/orders/42?b=2&a=1"
    assert response.content == b""
    assert upstream.received == []  # the data plane forwards, the sidecar only decides


@pytest.mark.parametrize(("uri", "headers", "status", "reason", "would_be"), [
    ("/api/x", {}, 401, "missing_credentials", "401"),
    ("/api/x", {"Authorization": "Bearer not.a.jwt"}, 401, "invalid_token", "401"),
    ("/scoped/x", "token", 403, "insufficient_scope", "403"),
    ("/nowhere", "token", 403, "no_route", "404"),
    ("/public/..%2fapi/x", {}, 403, "invalid_request", "400"),
    ("/public/..;/api/x", {}, 403, "invalid_request", "400"),
])
def test_nginx_refusals_are_401_or_403_with_reason(
    sidecar: RunningSidecar, idp_keys: KeyPair, uri: str, headers: dict[str, str] | str, status: int, reason: str,
    would_be: str,
) -> None:
    """/nginx answers every refusal as 401 or 403, with X-Auth-Reason and the proxy-mode status in X-Auth-Status."""
    sent = bearer(mint(idp_keys, scope="read")) if headers == "token" else headers
    assert isinstance(sent, dict)
    response = nginx_ask(sidecar, uri, sent)

    assert response.status_code == status
    assert response.headers["x-auth-reason"] == reason
    assert response.headers["x-auth-status"] == would_be
    assert "x-auth-subject" not in response.headers
    if status == 401:
        assert response.headers["www-authenticate"].startswith('Bearer realm="sidecar"')


def test_nginx_without_original_uri_is_refused(sidecar: RunningSidecar, idp_keys: KeyPair) -> None:
    """An ask without X-Original-URI, or with two, is a 403 (invalid_request), never an allow."""
    assert sidecar.decision_url is not None
    response = httpx.get(sidecar.decision_url + "/nginx", trust_env=False)
    twice = raw_request(sidecar.decision_url, "/nginx", {**bearer(mint(idp_keys)), "X-Original-Method": "GET",
                                                         "X-Original-URI": "/public/x", "X-Original-uri": "/api/x"})

    assert (response.status_code, response.headers["x-auth-reason"]) == (403, "invalid_request")
    assert (twice.status_code, twice.headers["x-auth-reason"]) == (403, "invalid_request")


def test_client_address_comes_from_a_trusted_data_plane_only(sidecar: RunningSidecar, idp_keys: KeyPair) -> None:
    """X-Forwarded-For is believed from a trusted data plane; from another peer a forged ask changes nothing."""
    headers = {**bearer(mint(idp_keys)), "X-Forwarded-For": "203.0.113.9"}

    trusted = nginx_ask(sidecar, "/office/x", headers)
    forged = nginx_ask(sidecar, "/office/x", headers, source="127.0.0.2")
    real_ip = nginx_ask(sidecar, "/office/x", {**bearer(mint(idp_keys)), "X-Real-IP": "203.0.113.10"})

    assert trusted.status_code == 200
    assert (forged.status_code, forged.headers["x-auth-reason"]) == (403, "ip_not_allowed")
    assert real_ip.status_code == 200


def test_traefik_refusals_are_proxy_mode_replies(sidecar: RunningSidecar, idp_keys: KeyPair) -> None:
    """/traefik refuses with the status, JSON body and challenge proxy mode would send."""
    missing = traefik_ask(sidecar, "/api/x")
    scoped = traefik_ask(sidecar, "/scoped/x", bearer(mint(idp_keys)))
    nowhere = traefik_ask(sidecar, "/nowhere", bearer(mint(idp_keys)))
    tricked = traefik_ask(sidecar, "/public/..%2fapi")

    error_body(missing, 401, "missing_credentials")
    assert missing.headers["www-authenticate"] == 'Bearer realm="sidecar"'
    error_body(scoped, 403, "insufficient_scope")
    error_body(nowhere, 404, "no_route")
    error_body(tricked, 400, "invalid_request")


def test_traefik_allow_answers_identity_headers(sidecar: RunningSidecar, idp_keys: KeyPair) -> None:
    """/traefik allows with 200 and the identity headers for authResponseHeaders / copy_headers."""
    response = traefik_ask(sidecar, "/api/x?access_token=" + mint(idp_keys, sub="bob"))

    assert response.status_code == 200
    assert response.headers["x-auth-subject"] == "bob"
    assert response.headers["x-auth-upstream-uri"] == "/api/x"


def envoy_ask(sidecar: RunningSidecar, target: str, headers: dict[str, str], method: str = "GET") -> httpx.Response:
    """An Envoy HTTP ext_authz check: the original method, `path_prefix` + the original path, the original headers
    (Envoy's :authority as Host, its x-forwarded-proto and x-envoy-* headers), no body."""
    assert sidecar.decision_url is not None
    return raw_request(sidecar.decision_url, "/envoy" + target, {  # type: ignore[return-value]
        "x-forwarded-proto": "https", "x-envoy-internal": "true", "x-request-id": "envoy-1",
        "x-envoy-expected-rq-timeout-ms": "250", "content-length": "0", **headers}, method=method)


def test_envoy_allow_names_headers_to_remove(sidecar: RunningSidecar, idp_keys: KeyPair) -> None:
    """/envoy allows with the identity headers and x-envoy-auth-headers-to-remove naming the credential header and
    every client-sent identity header."""
    response = envoy_ask(sidecar, "/api/x?a=1", {**bearer(mint(idp_keys, sub="carol")), "X-Auth-Subject": "admin",
                                                  "X-Auth-Whatever": "forged"}, method="POST")

    assert response.status_code == 200
    assert response.headers["x-auth-subject"] == "carol"
    assert response.headers["x-request-id"] == "envoy-1"
    removed = response.headers["x-envoy-auth-headers-to-remove"].split(",")
    assert set(removed) == {"authorization", "x-auth-subject", "x-auth-whatever"}


def test_envoy_cookie_credential_is_stripped(sidecar: RunningSidecar, idp_keys: KeyPair) -> None:
    """/envoy answers the Cookie header without the credential cookie (for allowed_upstream_headers)."""
    response = envoy_ask(sidecar, "/app/home", {"Cookie": f"theme=dark; session={mint(idp_keys, sub='dee')}"})

    assert response.status_code == 200
    assert response.headers["x-auth-subject"] == "dee"
    assert response.headers["cookie"] == "theme=dark"


def test_envoy_refusals_are_proxy_mode_replies(sidecar: RunningSidecar, idp_keys: KeyPair) -> None:
    """/envoy refuses with proxy mode's status and body, path tricks included."""
    error_body(envoy_ask(sidecar, "/api/x", {}), 401, "missing_credentials")
    error_body(envoy_ask(sidecar, "/scoped/x", bearer(mint(idp_keys))), 403, "insufficient_scope")
    error_body(envoy_ask(sidecar, "/public/..;/api/x", {}), 400, "invalid_request")
    error_body(envoy_ask(sidecar, "/public/..%2fapi/x", {}), 400, "invalid_request")
    error_body(envoy_ask(sidecar, "/public/%2e%2e/api/x", {}), 401, "missing_credentials")  # it is /api/x
    error_body(envoy_ask(sidecar, "/nowhere", bearer(mint(idp_keys))), 404, "no_route")


def test_unknown_decision_path_is_404(sidecar: RunningSidecar) -> None:
    """The decision port serves only /nginx, /traefik and /envoy/..."""
    assert sidecar.decision_url is not None
    error_body(httpx.get(sidecar.decision_url + "/api/x", trust_env=False), 404, "not_found")


def test_decisions_are_audited_and_counted_with_their_mode(sidecar: RunningSidecar, idp_keys: KeyPair) -> None:
    """Decision-mode audit lines say mode "decision" and the request counter has a mode label."""
    with captured_audit(sidecar) as buffer:
        nginx_ask(sidecar, "/api/x", {**bearer(mint(idp_keys, sub="audited")), "X-Request-Id": "decision-allow"})
        nginx_ask(sidecar, "/scoped/x", {**bearer(mint(idp_keys)), "X-Request-Id": "decision-deny"})
        lines = wait_for(lambda: len(_audit_lines(buffer, {"decision-allow", "decision-deny"})) == 2
                         and _audit_lines(buffer, {"decision-allow", "decision-deny"}))
    assert lines["decision-allow"]["mode"] == "decision"
    assert (lines["decision-allow"]["decision"], lines["decision-allow"]["subject"]) == ("allow", "audited")
    assert (lines["decision-deny"]["reason"], lines["decision-deny"]["status"]) == ("insufficient_scope", 403)
    assert "access_token" not in json.dumps(lines)
    metrics = httpx.get(sidecar.admin_url + "/metrics", trust_env=False).text
    assert 'sidecar_requests_total{decision="allow",mode="decision",route="api",status_class="2xx"}' in metrics


def test_decision_port_is_loopback_by_default(tmp_path: object, shared_upstream: RecordingUpstream,
                                              idp_keys: KeyPair) -> None:
    """`sidecar run --decision-port P` listens on 127.0.0.1 only unless SIDECAR_DECISION_HOST says otherwise."""
    from pathlib import Path

    from sidecar.testing import SidecarProcess, free_port

    path = Path(str(tmp_path)) / "sidecar.yaml"
    path.write_text(config_text(decision_config(shared_upstream.url, idp_keys)))
    port = free_port()
    with SidecarProcess(path, workers=2, args=("--decision-port", str(port))):  # the supervisor binds it
        assert httpx.get(f"http://127.0.0.1:{port}/nginx", trust_env=False).status_code == 403
        bound = _listening_addresses(port)
    assert bound == {"127.0.0.1"}


def _listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on for `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as table:
            for row in table.readlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    if len(address) == 8:
                        found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                    else:
                        found.add(address)
    return found


def test_check_warns_about_body_credentials_in_decision_mode(tmp_path: object, idp_keys: KeyPair) -> None:
    """`sidecar check --decision` warns that a route reading the body gets it in decision mode only from Envoy."""
    import subprocess
    import sys
    from pathlib import Path

    config = make_config("http://127.0.0.1:1", {
        "form_jwt": jwt_authenticator(idp_keys, **{"from": ["form:assertion"]}),
        "header_jwt": jwt_authenticator(idp_keys)},
        [route("form", "/form/**", ["form_jwt"]), route("header", "/header/**", ["header_jwt"])])
    path = Path(str(tmp_path)) / "sidecar.yaml"
    path.write_text(config_text(config))

    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "--decision", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    proxy_only = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(path)],
                                capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "request body" in line]
    assert len(warnings) == 1 and "route 'form'" in warnings[0] and "Envoy" in warnings[0]
    assert (proxy_only.returncode, proxy_only.stderr) == (0, "")


def test_nginx_reads_ingress_nginx_original_url(sidecar: RunningSidecar, idp_keys: KeyPair) -> None:
    """/nginx takes the path, query and host from ingress-nginx's X-Original-URL when there is no X-Original-URI."""
    assert sidecar.decision_url is not None
    token = mint(idp_keys, sub="erin")
    response = httpx.get(sidecar.decision_url + "/nginx", headers={
        "X-Original-Method": "GET", "X-Original-URL": f"https://app.example/api/x?access_token={token}&k=v",
        "X-Sent-From": "nginx-ingress-controller"}, trust_env=False)
    tricked = httpx.get(sidecar.decision_url + "/nginx", headers={
        "X-Original-Method": "GET", "X-Original-URL": "https://app.example/public/..%2fapi/x"}, trust_env=False)

    assert (response.status_code, response.headers["x-auth-subject"]) == (200, "erin")
    assert response.headers["x-auth-upstream-uri"] == "/api/x?k=v"
    assert (tricked.status_code, tricked.headers["x-auth-status"]) == (403, "400")
