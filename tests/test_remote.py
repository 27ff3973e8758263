"""`remote` authenticators (seed 001 "valida_token" and credential webservices, RFC 7662 introspection; SPEC §3):
a real validation service on loopback counting its calls, a real sidecar, a real recording upstream."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import error_body
from redis_support import redis_url  # noqa: F401  (fixture)
from validator_support import Call, validator

from sidecar.authn.remote_check import CheckResult, RemoteCheck, check
from sidecar.errors import DependencyUnavailable
from sidecar.outbound import guard
from sidecar.outbound.guard import ServiceClient
from sidecar.testing import free_port, running_sidecar

WORDS = {"one": " 1 \n", "true": "true", "S": "S", "yes": "Yes", "sim": "Sim", "zero": "0", "false": "FALSE",
         "N": "N", "no": "no", "nao": "NÃO", "maybe": "talvez", "empty": "", "two-words": "1 1", "json": '{"ok":1}'}
ACCEPTED = {"one", "true", "S", "yes", "sim"}
flaky_calls: list[str] = []


async def answer(call: Call):
    if call.path == "/valida_token":
        token = call.query.get("token", "")
        if token.startswith("good"):
            return 200, "S\n"
        if token == "bad":
            return 200, "N"
        if token == "slow":
            await asyncio.sleep(1.0)
            return 200, "1"
        if token == "slow-good":
            await asyncio.sleep(0.3)
            return 200, "1"
        if token == "boom":
            return 500, "1"
        if token == "flaky":
            flaky_calls.append(token)
            return (502, "bad gateway") if len(flaky_calls) == 1 else (200, "S")
        if token.startswith("word-"):
            return 200, WORDS[token[5:]]
        return 200, token  # echo: a token that is itself an answer word
    if call.path == "/auth":
        token = call.json().get("token")
        if token == "good":
            return 200, {"status": "OK", "userData": {"login": "joao", "nome": "João", "cidade": "São Paulo"}}
        if token == "nosubject":
            return 200, {"status": "OK", "userData": {"nome": "João"}}
        if token == "html":
            return 200, "<html>login</html>"
        return 401, {"status": "ERROR", "message": f"Usuário {token} e/ou senha inválidos"}
    if call.path == "/introspect":
        token = call.form().get("token")
        if token == "good":
            return 200, {"active": True, "sub": "u-1", "scope": "read write", "client_id": "01400-2",
                         "exp": int(time.time()) + 300}
        if token == "expired":
            return 200, {"active": True, "sub": "u-1", "exp": int(time.time()) - 5}
        if token == "weird":
            return 200, {"active": "yes"}
        if token.startswith("exp-"):  # an exp that is not a timestamp (json.dumps writes Infinity and NaN)
            exp = {"infinity": float("inf"), "nan": float("nan"), "null": None, "text": "tomorrow"}[token[4:]]
            return 200, {"active": True, "sub": "u-1", "exp": exp}
        return 200, {"active": False}
    return 404, "not found"


def config(upstream: str, service: str) -> str:
    common = {"type": "remote", "allow_private": True, "timeout": "500ms"}
    return json.dumps({
        "version": 1,
        "upstream": upstream,
        "authenticators": {
            "valida_token": {**common, "from": ["query:token", "header:X-Portal-Token"],
                             "url": service + "/valida_token?token={value}", "response": "boolean",
                             "cache_ttl": "60s", "negative_ttl": "30s"},
            "webservice": {**common, "from": ["header:X-Portal-Token"], "url": service + "/auth", "method": "POST",
                           "send": "json", "param": "token", "headers": {"X-Api-Key": "api-key-1"},
                           "response": "json_status", "subject_claim": "login"},
            "introspect": {**common, "from": ["header:Authorization"], "url": service + "/introspect",
                           "response": "introspection", "client_id": "sidecar", "client_secret": "s3cret:x"},
            "down": {**common, "from": ["query:token"], "url": f"http://127.0.0.1:{free_port()}/valida_token"},
        },
        "routes": [
            {"id": "boolean", "match": {"path": "/boolean/**"}, "auth": ["valida_token"]},
            {"id": "json", "match": {"path": "/json/**"}, "auth": ["webservice"]},
            {"id": "introspection", "match": {"path": "/introspect/**"}, "auth": ["introspect"]},
            {"id": "down", "match": {"path": "/down/**"}, "auth": ["down"]},
        ],
    })


@pytest.fixture
def service():
    flaky_calls.clear()
    with validator(answer) as (app, url):
        yield app, url


@pytest.fixture
def sidecar(upstream, service):
    with running_sidecar(config(upstream.url, service[1])) as sc:
        yield sc


def calls_for(app, path: str) -> list[Call]:
    return [c for c in app.calls if c.path == path]


def test_boolean_validator_called_once_for_five_requests(sidecar, upstream, service):
    """Five requests with one token within its cache_ttl: one call to valida_token, five 200s, token never forwarded."""
    app, _ = service
    for i in range(5):
        response = httpx.get(f"{sidecar.url}/boolean/edicao/{i}?token=good-1&page=2")
        assert response.status_code == 200
    assert [c.query for c in calls_for(app, "/valida_token")] == [{"token": "good-1"}]
    assert [r.query for r in upstream.received] == ["page=2"] * 5
    got = upstream.last
    assert got.header("x-auth-subject") == "token:" + hashlib.sha256(b"good-1").hexdigest()[:8]
    assert got.header("x-auth-method") == "valida_token"
    assert "good-1" not in json.dumps(got.headers)


def test_concurrent_misses_make_one_call(sidecar, service):
    """Ten concurrent first requests with one token make a single call to the validator."""
    app, _ = service
    with httpx.Client() as client, ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(
            lambda _: client.get(f"{sidecar.url}/boolean/x", headers={"X-Portal-Token": "slow-good"}).status_code,
            range(10)))
    assert statuses == [200] * 10
    assert len(calls_for(app, "/valida_token")) == 1


@pytest.mark.parametrize("word", sorted(WORDS))
def test_boolean_answers(sidecar, upstream, word):
    """1/true/S/yes/sim (any case, whitespace) accept; 0/false/N/no/não refuse (401); anything else is 503."""
    response = httpx.get(f"{sidecar.url}/boolean/x?token=word-{word}")
    if word in ACCEPTED:
        assert response.status_code == 200
    elif word in {"zero", "false", "N", "no", "nao"}:
        body = error_body(response, 401, "invalid_token")
        assert body["error_description"] == "the credential was refused by the validation service"
    else:
        body = error_body(response, 503, "dependency_unavailable")
        assert body["error_description"] == "the validation service gave an answer that cannot be read"
        assert upstream.received == []


def test_n_answer_is_401_and_cached_for_negative_ttl(sidecar, upstream, service):
    """An `N` answer is a 401; the refusal is cached, so a second try does not call the service again."""
    app, _ = service
    for _ in range(2):
        response = httpx.get(f"{sidecar.url}/boolean/x?token=bad")
        body = error_body(response, 401, "invalid_token")
        assert "bad" not in body["error_description"]
    assert len(calls_for(app, "/valida_token")) == 1
    assert upstream.received == []


def test_validator_down_is_503(sidecar, upstream):
    """A validation service nobody answers on: 503 dependency_unavailable, never an accept."""
    body = error_body(httpx.get(f"{sidecar.url}/down/x?token=good"), 503, "dependency_unavailable")
    assert body["error_description"] == "the validation service is unreachable"
    assert upstream.received == []


def test_validator_timeout_is_503(sidecar, upstream):
    """A validation service slower than `timeout` (500 ms): 503."""
    started = time.monotonic()
    body = error_body(httpx.get(f"{sidecar.url}/boolean/x?token=slow"), 503, "dependency_unavailable")
    assert body["error_description"] == "the validation service did not answer in time"
    assert time.monotonic() - started < 0.9
    assert upstream.received == []


def test_validator_error_status_is_503_even_with_a_yes(sidecar, upstream):
    """A 500 whose body says `1` is not a yes: 503."""
    body = error_body(httpx.get(f"{sidecar.url}/boolean/x?token=boom"), 503, "dependency_unavailable")
    assert body["error_description"] == "the validation service failed"
    assert upstream.received == []


def test_unavailability_is_not_cached(sidecar, service):
    """A 503 is not remembered: once the service answers again, the same token is accepted."""
    app, _ = service
    error_body(httpx.get(f"{sidecar.url}/boolean/x?token=flaky"), 503, "dependency_unavailable")
    assert httpx.get(f"{sidecar.url}/boolean/x?token=flaky").status_code == 200
    assert len(calls_for(app, "/valida_token")) == 2


def test_value_is_url_encoded_into_the_url(sidecar, service):
    """`{value}` is URL-encoded: a token with `&`, `/`, `=` and spaces reaches the service intact."""
    app, _ = service
    token = "good a&b=c/d?e"
    assert httpx.get(f"{sidecar.url}/boolean/x", params={"token": token}).status_code == 200
    assert calls_for(app, "/valida_token")[0].query == {"token": token}


def test_private_address_allowed_unless_the_guard_is_on(service):
    """A validator on a literal loopback address is the operator's own service: accepted when the config loads;
    `allow_private: false` turns the SSRF guard on and refuses it (names resolving there: when called)."""
    from sidecar.config.loader import parse
    from sidecar.config.yaml_lines import ConfigError

    _, url = service
    config = {"version": 1, "upstream": "http://127.0.0.1:1",
              "authenticators": {"private": {"type": "remote", "from": ["query:token"], "url": url + "/valida_token"}},
              "routes": [{"id": "private", "match": {"path": "/private/**"}, "auth": ["private"]}]}
    assert parse(json.dumps(config), "sidecar.yaml", {}).config.routes[0].id == "private"
    config["authenticators"]["private"]["allow_private"] = False
    with pytest.raises(ConfigError) as refused:
        parse(json.dumps(config), "sidecar.yaml", {})
    assert "allow_private: false" in refused.value.errors[0]


def test_json_status_ok_gives_the_user_data_identity(sidecar, upstream, service):
    """`{"status":"OK","userData":{...}}`: 200, the subject from `subject_claim`; the call carries the API key."""
    app, _ = service
    response = httpx.get(f"{sidecar.url}/json/perfil", headers={"X-Portal-Token": "good"})
    assert response.status_code == 200
    got = upstream.last
    assert got.header("x-auth-subject") == "joao"
    assert got.header("x-auth-method") == "webservice"
    assert "x-portal-token" not in got.header_names()
    (call,) = calls_for(app, "/auth")
    assert call.method == "POST"
    assert call.json() == {"token": "good"}
    assert call.headers["x-api-key"] == "api-key-1"


def test_json_status_error_is_401(sidecar, upstream):
    """`{"status":"ERROR","message":...}` (here with HTTP 401): 401 invalid_token, the message not echoed."""
    response = httpx.get(f"{sidecar.url}/json/perfil", headers={"X-Portal-Token": "wrong-pass"})
    body = error_body(response, 401, "invalid_token")
    assert body["error_description"] == "the credential was refused by the validation service"
    assert "wrong-pass" not in response.text
    assert upstream.received == []


@pytest.mark.parametrize("token", ["nosubject", "html"])
def test_json_status_unreadable_is_503(sidecar, upstream, token):
    """An OK without the configured subject field, or a page that is not JSON: 503, never an accept."""
    response = httpx.get(f"{sidecar.url}/json/perfil", headers={"X-Portal-Token": token})
    error_body(response, 503, "dependency_unavailable")
    assert upstream.received == []


def test_introspection_active_token(sidecar, upstream, service):
    """RFC 7662 `active: true`: 200 with sub, client_id and scope; the sidecar authenticates with HTTP Basic."""
    app, _ = service
    response = httpx.get(f"{sidecar.url}/introspect/x", headers={"Authorization": "Bearer good"})
    assert response.status_code == 200
    got = upstream.last
    assert (got.header("x-auth-subject"), got.header("x-auth-client")) == ("u-1", "01400-2")
    assert got.header("x-auth-scopes") == "read write"
    assert "authorization" not in got.header_names()
    (call,) = calls_for(app, "/introspect")
    assert call.method == "POST" and call.form() == {"token": "good"}
    assert call.headers["authorization"] == "Basic " + base64.b64encode(b"sidecar:s3cret%3Ax").decode()


@pytest.mark.parametrize(("token", "status"), [("bad", 401), ("expired", 401), ("weird", 503), ("exp-infinity", 503),
                                             ("exp-nan", 503), ("exp-null", 503), ("exp-text", 503)])
def test_introspection_inactive_expired_or_malformed(sidecar, upstream, token, status):
    """`active: false` and an `exp` in the past are 401; an `active` that is not a boolean, or an `exp` that is not
    a timestamp (Infinity would never expire), is a malformed answer: 503."""
    response = httpx.get(f"{sidecar.url}/introspect/x", headers={"Authorization": f"Bearer {token}"})
    error_body(response, status, "invalid_token" if status == 401 else "dependency_unavailable")
    if status == 401:
        assert response.headers["www-authenticate"] == 'Bearer realm="sidecar", error="invalid_token"'
    assert upstream.received == []


def fake_dns(monkeypatch, answers: dict[str, list[str]]) -> None:
    """Resolve the given names to the given addresses (everything else as usual)."""
    import socket

    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in answers[host]]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def run_check(url: str, allow_private: bool = False) -> CheckResult:
    """One check with the address guard on (`allow_private: false`), unless told otherwise."""
    async def go() -> CheckResult:
        async with ServiceClient() as http:
            return await check(http, RemoteCheck(url=url, allow_private=allow_private), "good-1")

    return asyncio.run(go())


def test_call_is_pinned_to_the_checked_address(monkeypatch, service):
    """With the guard on, the name is resolved once, checked, and the connection pinned; Host keeps the name."""
    app, url = service
    port = httpx.URL(url).port
    fake_dns(monkeypatch, {"validator.example": ["127.0.0.1"]})
    monkeypatch.setattr(guard, "forbidden_reason", lambda ip: None)  # this test's loopback stands for the internet
    assert run_check(f"http://validator.example:{port}/valida_token").accepted
    (call,) = app.calls
    assert call.headers["host"] == f"validator.example:{port}"
    assert call.query == {"token": "good-1"}


@pytest.mark.parametrize("addresses", [["10.0.0.5"], ["169.254.169.254"], ["93.184.215.14", "127.0.0.1"]])
def test_name_resolving_to_an_internal_address_is_refused(monkeypatch, service, addresses):
    """Guard on: a public-looking name answering with any internal address is refused before connecting: 503."""
    app, _ = service
    fake_dns(monkeypatch, {"validator.example": addresses})
    with pytest.raises(DependencyUnavailable) as refused:
        run_check("http://validator.example/valida_token")
    assert refused.value.description == "the validation service is unavailable"
    assert app.calls == []


def with_redis(config_text: str, redis: str) -> str:
    data = json.loads(config_text)
    data["redis"] = redis
    return json.dumps(data)


def test_verdicts_are_shared_by_replicas_through_redis(upstream, service, redis_url):  # noqa: F811
    """With Redis, a validator's yes and no are asked once for every replica: the second sidecar uses them."""
    app, url = service
    text = with_redis(config(upstream.url, url), redis_url)
    with running_sidecar(text) as first, running_sidecar(text) as second:
        assert httpx.get(f"{first.url}/boolean/x?token=good-1").status_code == 200
        assert httpx.get(f"{first.url}/boolean/x?token=bad").status_code == 401
        assert httpx.get(f"{second.url}/boolean/x?token=good-1").status_code == 200
        assert httpx.get(f"{second.url}/boolean/x?token=bad").status_code == 401
    assert len(calls_for(app, "/valida_token")) == 2
    stored = redis_verdicts(redis_url)
    assert len(stored) == 2  # the yes and the no, under hashes
    assert not any("good-1" in key + value for key, value in stored.items())


def test_redis_down_makes_shared_verdicts_a_miss_not_a_refusal(upstream, service):
    """Redis configured but unreachable: the validator is still asked and its answer stands."""
    app, url = service
    with running_sidecar(with_redis(config(upstream.url, url), f"redis://127.0.0.1:{free_port()}/0")) as sc:
        assert httpx.get(f"{sc.url}/boolean/x?token=good-2", timeout=10).status_code == 200
        assert httpx.get(f"{sc.url}/boolean/x?token=bad", timeout=10).status_code == 401
    assert len(calls_for(app, "/valida_token")) == 2


def redis_verdicts(url: str) -> dict[str, str]:
    import redis

    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return {key: client.get(key) or "" for key in client.scan_iter(match="sidecar:verdict:*")}
    finally:
        client.close()
