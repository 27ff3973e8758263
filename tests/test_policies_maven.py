"""The Maven example policies (seed 001) pass `sidecar check` as shipped, and work end to end when their
environment points them at real services."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from validator_support import Call, validator

from sidecar.state.client_token_store import new_token, token_hash
from sidecar.testing import running_sidecar

POLICIES = Path(__file__).resolve().parent.parent / "policies"
MAVEN = ["maven_webservice.yaml", "maven_ip_key.yaml", "maven_third_party_token.yaml", "maven_cookie.yaml"]


def check(path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAVEN_", "SIDECAR_"))}
    return subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(path)],
                          capture_output=True, text=True, check=False, env=env)


@pytest.mark.parametrize("name", MAVEN)
def test_policy_passes_check(name):
    """Each Maven policy passes `sidecar check` with no environment set; only ip_key warns (no keys.secret)."""
    result = check(POLICIES / name)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{POLICIES / name}: ok (1 routes, 1 authenticators)\n"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    if name == "maven_ip_key.yaml":
        assert len(warnings) == 1 and "keys.secret is not set" in warnings[0]
    else:
        assert warnings == []


def answer(call: Call):
    if call.path == "/api/autentica":
        if call.json() == {"token": "good"} and call.headers.get("x-api-key") == "k-1":
            return 200, {"status": "OK", "userData": {"login": "joao", "nome": "João"}}
        return 200, {"status": "ERROR", "message": "Usuário e/ou senha inválidos"}
    return 200, "S" if call.query.get("token") == "good" else "N"


@pytest.fixture
def service(monkeypatch, upstream):
    with validator(answer) as (app, url):
        monkeypatch.setenv("MAVEN_UPSTREAM", upstream.url)
        monkeypatch.setenv("MAVEN_ALLOW_PRIVATE", "true")
        monkeypatch.setenv("MAVEN_AUTH_URL", url + "/api/autentica")
        monkeypatch.setenv("MAVEN_AUTH_API_KEY", "k-1")
        monkeypatch.setenv("MAVEN_VALIDA_TOKEN_URL", url + "/valida_token.php")
        monkeypatch.setenv("MAVEN_REVALIDATE_URL", url + "/sessao/valida")
        monkeypatch.delenv("SIDECAR_REDIS_URL", raising=False)
        yield app


@pytest.mark.parametrize(("name", "good", "bad", "subject"), [
    ("maven_webservice.yaml", {"headers": {"X-Subscriber-Token": "good"}},
     {"headers": {"X-Subscriber-Token": "bad"}}, "joao"),
    ("maven_third_party_token.yaml", {"params": {"token": "good"}}, {"params": {"token": "bad"}}, None),
    ("maven_cookie.yaml", {"headers": {"Cookie": "PORTAL_SESSION=good; theme=dark"}},
     {"headers": {"Cookie": "PORTAL_SESSION=bad"}}, None),
])
def test_remote_policies_work(service, upstream, name, good, bad, subject):
    """The webservice, third-party token and cookie policies accept a good credential and refuse a bad one."""
    with running_sidecar((POLICIES / name).read_text()) as sc:
        response = httpx.get(f"{sc.url}/pub/revista/", **good)
        assert response.status_code == 200, response.text
        if subject:
            assert upstream.last.header("x-auth-subject") == subject
        assert "good" not in upstream.last.query + str(upstream.last.headers)
        assert httpx.get(f"{sc.url}/pub/revista/", **bad).status_code == 401
    assert len(upstream.received) == 1


def test_ip_key_policy_works(monkeypatch, upstream):
    """The ip_key policy: a client token issues a key, the key logs in, the session cookie follows, logout ends it."""
    token = new_token()
    monkeypatch.setenv("MAVEN_UPSTREAM", upstream.url)
    monkeypatch.setenv("MAVEN_CLIENT_TOKEN_HASH", f"sha256:{token_hash(token)}")
    monkeypatch.delenv("SIDECAR_REDIS_URL", raising=False)
    with running_sidecar((POLICIES / "maven_ip_key.yaml").read_text()) as sc:
        issued = httpx.post(sc.url + "/_sidecar/keys", headers={"X-Client-Token": token},
                            json={"user": "joao", "ip": "127.0.0.1", "url_logout": "https://portal.example/"})
        assert issued.status_code == 200, issued.text
        response = httpx.get(f"{sc.url}/pub/revista/?key={issued.json()['key']}")
        assert response.status_code == 200
        assert upstream.last.header("x-auth-subject") == "joao"
        cookie = response.headers["set-cookie"].split(";", 1)[0]
        assert httpx.get(f"{sc.url}/pub/revista/2", headers={"Cookie": cookie}).status_code == 200
        logout = httpx.get(f"{sc.url}/pub/logout", headers={"Cookie": cookie})
        assert (logout.status_code, logout.headers["location"]) == (303, "https://portal.example/")
