"""The shipped token policies (seeds 002, 003, 004): each passes `sidecar check`, and each works as its
comments say when run with the environment it documents."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest

from sidecar.testing import KeyPair, RecordingUpstream, running_sidecar

POLICIES = Path(__file__).resolve().parent.parent / "policies"
ADMIN = "policy-admin-token-0123456789abcdef"
KEYS_SECRET = "policy-keys-secret-0123456789abcdef-0123456789"


def sha256(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def signing_pem() -> str:
    """A signing key as an operator makes one: `sidecar keygen`."""
    return subprocess.run([sys.executable, "-m", "sidecar", "keygen"], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.parametrize(("policy", "summary"), [
    ("engage_sso.yaml", "ok (2 routes, 2 authenticators)"),
    ("totvs_client_credentials.yaml", "ok (1 routes, 1 authenticators)"),
    ("nexchat_client_jwt.yaml", "ok (1 routes, 1 authenticators)"),
])
def test_policy_passes_check(signing_pem: str, policy: str, summary: str) -> None:
    """`sidecar check` accepts the policy with only the variables it documents as required."""
    env = {**os.environ, "SIDECAR_SIGNING_KEY": signing_pem, "SIDECAR_KEYS_SECRET": KEYS_SECRET}
    path = POLICIES / policy
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(path)],
                            capture_output=True, text=True, env=env)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: {summary}\n"
    assert result.stderr == ""


def test_nexchat_policy_accepts_the_seed_request(monkeypatch: pytest.MonkeyPatch, upstream: RecordingUpstream) -> None:
    """nexchat_client_jwt.yaml: the ERP's base64 PKCS#1 key in the environment; its signed `{id, token}` passes."""
    erp = KeyPair("RSA", 4096)
    monkeypatch.setenv("NEXCHAT_UPSTREAM", upstream.url)
    monkeypatch.setenv("NEXCHAT_ERP_PUBLIC_KEY", base64.b64encode(erp.public_pem_pkcs1.encode()).decode())
    token = jwt.encode({"email": "wagnerteste@ixcsoft.com.br", "nome": "Wagner", "iat": int(time.time())},
                       erp.private_key, algorithm="RS256")
    with running_sidecar((POLICIES / "nexchat_client_jwt.yaml").read_text()) as sc:
        response = httpx.post(sc.url + "/uzera/login/chamar-suporte",
                              json={"id": "3", "notRedirect": True, "token": token})

    assert response.status_code == 200
    [got] = upstream.received
    assert json.loads(got.body) == {"id": "3", "notRedirect": True}
    assert (got.header("x-auth-client"), got.header("x-auth-subject")) == ("3", "wagnerteste@ixcsoft.com.br")


def test_totvs_policy_issues_and_accepts_a_client_credentials_token(
    monkeypatch: pytest.MonkeyPatch, upstream: RecordingUpstream, signing_pem: str,
) -> None:
    """totvs_client_credentials.yaml: the seed's token URL with Basic gives a /btb token the API accepts."""
    monkeypatch.setenv("DATASUL_UPSTREAM", upstream.url)
    monkeypatch.setenv("SIDECAR_SIGNING_KEY", signing_pem)
    monkeypatch.setenv("TOTVS_CLIENT_SECRET_HASH", sha256("s3cret-of-the-erp"))
    with running_sidecar((POLICIES / "totvs_client_credentials.yaml").read_text()) as sc:
        issued = httpx.post(sc.url + "/totvs-login-oauth2/oauth2/token?grant_type=client_credentials",
                            auth=("erp-parceiro", "s3cret-of-the-erp"))
        token = issued.json()["access_token"]
        response = httpx.get(sc.url + "/api/btb/v1/properties/general", headers={"Authorization": f"Bearer {token}"})

    assert issued.status_code == 200
    assert {k: v for k, v in issued.json().items() if k != "access_token"} == {
        "token_type": "Bearer", "expires_in": 120, "scope": "/btb"}
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == "jwt.io.apache.externo"
    assert response.status_code == 200
    assert upstream.last.header("x-auth-client") == "erp-parceiro"


def test_engage_policy_custom_sso_then_key_then_access_token(
    monkeypatch: pytest.MonkeyPatch, upstream: RecordingUpstream, signing_pem: str,
) -> None:
    """engage_sso.yaml: map an identifier, custom_sso gives a token and a key; the key opens /sso once, the token
    opens /api as a query parameter."""
    for name, value in {"ENGAGE_UPSTREAM": upstream.url, "SIDECAR_SIGNING_KEY": signing_pem,
                        "SIDECAR_KEYS_SECRET": KEYS_SECRET, "SIDECAR_ADMIN_TOKEN": ADMIN,
                        "ENGAGE_CLIENT_SECRET_HASH": sha256("fluig-secret"),
                        "ENGAGE_CUSTOMER_TOKEN_HASH": sha256("sct_fluig-customer-token")}.items():
        monkeypatch.setenv(name, value)
    with running_sidecar((POLICIES / "engage_sso.yaml").read_text()) as sc:
        mapped = httpx.post(sc.admin_url + "/admin/identifiers", headers={"Authorization": f"Bearer {ADMIN}"},
                            json=[{"user_login": "maria", "client_application_id": "fluig", "identifier": "42"}])
        issued = httpx.post(sc.url + "/_sidecar/oauth2/token", data={
            "grant_type": "custom_sso", "client_id": "fluig", "client_secret": "fluig-secret",
            "customer_token": "sct_fluig-customer-token", "customer_id": "c1", "user_identifier": "42"})
        sso = httpx.get(sc.url + "/sso/start", params={"key": issued.json()["key"]})
        api = httpx.get(sc.url + "/api/me", params={"access_token": issued.json()["access_token"]})

    assert mapped.status_code == 201
    assert issued.status_code == 200
    assert sso.status_code == 200
    assert sso.headers["set-cookie"].startswith("engage_sess=")
    assert api.status_code == 200
    assert [(r.path, r.header("x-auth-subject"), r.query) for r in upstream.received] == [
        ("/sso/start", "maria", ""), ("/api/me", "maria", "")]
