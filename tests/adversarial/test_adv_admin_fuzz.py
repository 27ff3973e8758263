"""API fuzzing of the admin port (schemathesis, from the OpenAPI document the admin port serves at /openapi.json):
whatever is sent, with the admin token, a wrong one or none, the admin API answers without a 5xx and never echoes
a configured secret."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from adversarial_support import (  # noqa: F401  (fixtures)
    ADMIN_TOKEN,
    KEYS_SECRET,
    PARTNER_SECRET,
    PARTNER_TOKEN,
    SIGNING_KEYS,
    StrictUpstream,
    attacked_config,
    strict_upstream_server,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.testing import KeyPair, RunningSidecar, running_sidecar

WEBHOOK_SECRET = "whsec_" + "QWRtaW5GdXp6V2ViaG9va1NlY3JldDAxMjM0NTY3ODk="


@pytest.fixture(scope="module")
def admin_sidecar(strict_upstream_server: StrictUpstream, idp_keys: KeyPair) -> Iterator[RunningSidecar]:  # noqa: F811
    config = json.loads(attacked_config(strict_upstream_server.url, idp_keys))
    # The fuzzer sends thousands of wrong admin tokens from one address: lift the attempt limit (issue 17,
    # tests/test_attempt_limits.py) so every reply is the API's own, not 429.
    config["limits"] = {"attempts": {"per_address": 1_000_000}}
    config["webhooks"] = [{"id": "erp", "url": "http://127.0.0.1:9/hooks", "allow_private": True,
                           "events": ["client.token.created"], "secret": WEBHOOK_SECRET}]
    with running_sidecar(json.dumps(config)) as sc:
        yield sc


def secrets() -> list[str]:
    """Everything secret the configuration holds, and pieces of the signing key."""
    pem_lines = [line for line in SIGNING_KEYS.private_pem.splitlines() if "-----" not in line]
    return [ADMIN_TOKEN, PARTNER_TOKEN, PARTNER_SECRET, KEYS_SECRET, WEBHOOK_SECRET, WEBHOOK_SECRET[6:], *pem_lines]


@pytest.fixture(scope="module")
def operations(admin_sidecar: RunningSidecar) -> list:
    """The operations of the document the running admin port serves."""
    schema = schemathesis.openapi.from_url(admin_sidecar.admin_url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


AUTH = st.sampled_from([f"Bearer {ADMIN_TOKEN}", f"bearer {ADMIN_TOKEN}", "Bearer wrong", "", f"Basic {ADMIN_TOKEN}"])


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode))
def test_admin_api_fuzzed_never_5xx_never_leaks(
    admin_sidecar: RunningSidecar, operations: list, mode: schemathesis.GenerationMode,
) -> None:
    """Schema-valid and schema-breaking requests to every admin operation: no 5xx, no configured secret in a reply."""
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in operations])
    leaks = secrets()
    statuses: set[int] = set()
    with requests.Session() as session:

        @settings(max_examples=60, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
        @given(case=strategy, authorization=AUTH)
        def fuzz(case: schemathesis.Case, authorization: str) -> None:
            headers = {"Authorization": authorization} if authorization else {}
            response = case.call(base_url=admin_sidecar.admin_url, session=session, headers=headers, timeout=10)
            assert response.status_code < 500, (case.method, case.formatted_path, response.status_code,
                                                 response.text[:300])
            statuses.add(response.status_code)
            text = response.text
            assert [s for s in leaks if s in text] == [], (case.method, case.formatted_path)
            for name, value in response.headers.items():
                assert [s for s in leaks if s in value] == [], name

        fuzz()
    assert 401 in statuses and statuses - {401}, statuses  # the fuzzer was both stopped at the guard and let past it


def test_admin_api_refuses_without_the_token(admin_sidecar: RunningSidecar, operations: list) -> None:
    """Every guarded operation answers 401 invalid_token with no or a wrong admin token; nothing changes."""
    assert len(operations) >= 12, " ".join(op.label for op in operations)  # schemathesis leaves out /openapi.json
    with requests.Session() as session:
        for op in operations:
            if op.path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
                continue
            path = op.path.format(client_id="partner-1", token_id="t", delivery_id="d")
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
                            {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}):
                response = session.request(op.method.upper(), admin_sidecar.admin_url + path, headers=headers,
                                            json={}, timeout=10)
                assert response.status_code == 401, (op.method, path, headers)
                assert response.json()["error"] == "invalid_token"


def test_served_document_describes_every_admin_route(admin_sidecar: RunningSidecar) -> None:
    """GET /openapi.json (no token) lists every admin route with its methods; guarded ones need the bearer token."""
    document = requests.get(admin_sidecar.admin_url + "/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.")
    described = {(method, path) for path, item in document["paths"].items() for method in item}
    assert described >= {
        ("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics"), ("get", "/admin/clients"),
        ("post", "/admin/clients/{client_id}/tokens"), ("delete", "/admin/clients/{client_id}/tokens/{token_id}"),
        ("put", "/admin/clients/{client_id}/public-key"), ("patch", "/admin/clients/{client_id}/public-key"),
        ("post", "/admin/identifiers"), ("get", "/admin/webhooks/deliveries"),
        ("post", "/admin/webhooks/deliveries/{delivery_id}/retry"), ("post", "/admin/reload"),
    }
    assert document["paths"]["/healthz"]["get"]["security"] == []
    assert "401" in document["paths"]["/admin/reload"]["post"]["responses"]
