"""OpenTelemetry tracing (issue 16): spans reach a real OTLP/HTTP receiver (a loopback server decoding the
protobuf ExportTraceServiceRequest), with the request's structure and attributes and never a credential."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.echo import read_body
from sidecar.state.client_token_store import new_token, token_hash
from sidecar.testing import KeyPair, recording_upstream, redis_url_for_tests, running_sidecar, serve_in_thread
from tests.validator_support import validator

CLIENT_TOKEN = new_token()
REMOTE_TOKEN = "remote-credential-0a1b2c3d4e5f"
INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_PARENT = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP trace endpoint: POST /v1/traces with an ExportTraceServiceRequest body."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await read_body(receive)
        if scope["path"] == "/v1/traces":
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource in request.resource_spans:
                for scoped in resource.scope_spans:
                    self.spans.extend(scoped.spans)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-protobuf")]})
        await send({"type": "http.response.body", "body": b""})


def attributes(span: Any) -> dict[str, Any]:
    values = {}
    for item in span.attributes:
        value = item.value
        values[item.key] = getattr(value, value.WhichOneof("value"))
    return values


def test_spans_of_jwt_remote_and_client_token_requests_reach_an_otlp_receiver(monkeypatch):
    """Each request is one SERVER span with route, status, decision and authenticator; the remote check, the client
    token lookup and the upstream call are its children; the upstream gets a traceparent of the same trace; an
    incoming traceparent is continued; trace_id is in the audit line; no credential or query in any attribute."""
    keys = KeyPair()
    jwt_token = keys.token({"sub": "alice", "scope": "read"})
    receiver = Receiver()
    with serve_in_thread(receiver) as otlp, validator(lambda call: (200, "true")) as (_, service), \
            recording_upstream() as up, serve_in_thread(_jwks_app(keys.jwks())) as jwks_url:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "sidecar-under-test")
        config = {
            "version": 1, "upstream": up.url, "redis": redis_url_for_tests(15),
            "authenticators": {
                "partner": {"type": "jwt", "jwks_url": jwks_url + "/jwks.json"},
                "portal": {"type": "remote", "from": ["query:token"], "allow_private": True,
                           "url": service + "/valida_token?token={value}", "response": "boolean"},
                "tokens": {"type": "client_token"},
            },
            "clients": [{"id": "c1", "tokens": [f"sha256:{token_hash(CLIENT_TOKEN)}"]}],
            "routes": [{"id": "jwt", "match": {"path": "/jwt/**"}, "auth": ["partner"]},
                       {"id": "portal", "match": {"path": "/portal/**"}, "auth": ["portal"]},
                       {"id": "tokens", "match": {"path": "/tokens/**"}, "auth": ["tokens"]}],
        }
        audit: list[dict[str, Any]] = []
        with running_sidecar(config) as sc:
            sc.services.audit.record = audit.append  # what the audit line would say
            traceparent = f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01"
            assert httpx.get(sc.url + "/jwt/1?page=2", headers={"Authorization": f"Bearer {jwt_token}",
                                                                 "traceparent": traceparent}).status_code == 200
            jwt_seen = up.last
            assert httpx.get(sc.url + "/portal/1", params={"token": REMOTE_TOKEN}).status_code == 200
            assert httpx.get(sc.url + "/tokens/1", headers={"X-Client-Token": CLIENT_TOKEN}).status_code == 200
            tokens_seen = up.last
        deadline = time.monotonic() + 5
        while len(receiver.spans) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
    servers = {attributes(s)["http.route"]: s for s in receiver.spans if s.kind == s.SPAN_KIND_SERVER}
    assert set(servers) == {"jwt", "portal", "tokens"}
    by_id = {s.span_id: s for s in receiver.spans}

    jwt_span = servers["jwt"]
    assert jwt_span.trace_id.hex() == INCOMING_TRACE and jwt_span.parent_span_id.hex() == INCOMING_PARENT
    assert jwt_span.name == "GET jwt"
    expected = {"http.request.method": "GET", "url.path": "/jwt/1", "http.route": "jwt",
                "http.response.status_code": 200, "sidecar.decision": "allow", "sidecar.reason": "ok",
                "sidecar.authenticator": "partner"}
    assert {key: attributes(jwt_span).get(key) for key in expected} == expected
    upstream_traceparent = jwt_seen.header("traceparent")
    assert upstream_traceparent is not None and upstream_traceparent.split("-")[1] == INCOMING_TRACE
    upstream_span = by_id[bytes.fromhex(upstream_traceparent.split("-")[2])]
    assert upstream_span.kind == upstream_span.SPAN_KIND_CLIENT and upstream_span.parent_span_id == jwt_span.span_id
    assert audit[0]["trace_id"] == INCOMING_TRACE

    def children(server: Any) -> dict[str, Any]:
        return {s.name: s for s in receiver.spans if s.parent_span_id == server.span_id}

    assert set(children(servers["portal"])) == {"remote.check", "upstream"}
    assert set(children(servers["tokens"])) == {"client_token.lookup", "upstream"}
    assert attributes(children(servers["tokens"])["client_token.lookup"])["db.system"] == "redis"
    assert attributes(servers["tokens"])["sidecar.client"] == "c1"
    assert tokens_seen.header("traceparent").split("-")[1] == servers["tokens"].trace_id.hex()

    everything = repr([(s.name, attributes(s)) for s in receiver.spans])
    for secret in (jwt_token, jwt_token.split(".")[2], CLIENT_TOKEN, REMOTE_TOKEN, "page=2", "token="):
        assert secret not in everything


def _jwks_app(jwks: dict[str, Any]) -> Any:
    body = json.dumps(jwks).encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app


OFF = [{}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"}]


@pytest.mark.parametrize("otel_env", OFF)
def test_tracing_off_imports_nothing_of_opentelemetry(otel_env: dict[str, str]):
    """With tracing off (no endpoint, or OTEL_SDK_DISABLED), serving requests imports no opentelemetry module beyond
    what redis-py itself imports when the package is installed (its optional observability hooks)."""
    script = (
        "import json, sys, httpx, redis.asyncio, redis.cluster\n"
        "before = {m for m in sys.modules if m.startswith('opentelemetry')}\n"
        "from sidecar.testing import recording_upstream, running_sidecar\n"
        "with recording_upstream() as up:\n"
        "    cfg = {'version': 1, 'upstream': up.url, 'authenticators': {'p': {'type': 'anonymous'}},\n"
        "           'routes': [{'id': 'all', 'match': {'path': '/**'}, 'auth': ['p']}]}\n"
        "    with running_sidecar(cfg) as sc:\n"
        "        assert httpx.get(sc.url + '/x').status_code == 200\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'sidecar.ops.otel'))\n"
        "                        and m not in before)))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**env, **otel_env})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_unsampled_requests_make_no_span_and_a_sampled_parent_is_followed(monkeypatch):
    """At ratio 0 nothing is exported and no traceparent is added upstream (a client's passes as it came), but a
    request whose incoming traceparent says "sampled" is traced, continuing that trace (W3C Trace Context)."""
    receiver = Receiver()
    with serve_in_thread(receiver) as otlp, recording_upstream() as up:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
        config = {"version": 1, "upstream": up.url, "authenticators": {"open": {"type": "anonymous"}},
                  "routes": [{"id": "open", "match": {"path": "/**"}, "auth": ["open"]}]}
        unsampled = f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-00"
        with running_sidecar(config) as sc:
            for _ in range(20):
                assert httpx.get(sc.url + "/plain").status_code == 200
            assert httpx.get(sc.url + "/parent-unsampled", headers={"traceparent": unsampled}).status_code == 200
            assert httpx.get(sc.url + "/parent-sampled",
                             headers={"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01"}).status_code == 200
        deadline = time.monotonic() + 5
        while len(receiver.spans) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    received = {r.path: r.header("traceparent") for r in up.received}
    assert received["/plain"] is None
    assert received["/parent-unsampled"] == unsampled
    assert received["/parent-sampled"] is not None and received["/parent-sampled"].split("-")[1] == INCOMING_TRACE
    assert {span.trace_id.hex() for span in receiver.spans} == {INCOMING_TRACE}
    assert {attributes(span).get("url.path") for span in receiver.spans if span.kind == span.SPAN_KIND_SERVER} == {
        "/parent-sampled"}


def test_cache_result_and_webhook_delivery_are_traced(monkeypatch):
    """The server span and the audit line say whether the verdict came from the cache (miss, then hit), and a
    webhook delivery raised by the route's `emit` is a span of its own, with the webhook and event named."""
    from tests.test_webhooks import SECRET
    from tests.test_webhooks import Receiver as HookReceiver

    keys = KeyPair()
    token = keys.token({"sub": "alice"})
    receiver, hooks = Receiver(), HookReceiver()
    with serve_in_thread(receiver) as otlp, serve_in_thread(hooks) as hooks_url, recording_upstream() as up:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        config = {
            "version": 1, "upstream": up.url,
            "authenticators": {"partner": {"type": "jwt", "keys": [keys.public_pem]}},
            "routes": [{"id": "pay", "match": {"path": "/pay/**"}, "auth": ["partner"],
                        "emit": [{"event": "paid", "when": "2xx"}]}],
            "webhooks": [{"id": "erp", "url": hooks_url + "/hooks", "events": ["paid"], "secret": SECRET,
                          "allow_private": True}],
        }
        audit: list[dict[str, Any]] = []
        with running_sidecar(config) as sc:
            sc.services.audit.record = audit.append
            for _ in range(2):
                assert httpx.get(sc.url + "/pay/1", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            deadline = time.monotonic() + 5
            while (len(hooks.hooks) < 2 or not any(s.name == "webhook.delivery" for s in receiver.spans)) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
    assert [line.get("cache") for line in audit if line.get("route") == "pay"] == ["miss", "hit"]
    servers = [s for s in receiver.spans if s.kind == s.SPAN_KIND_SERVER]
    assert sorted(attributes(s).get("sidecar.cache") for s in servers) == ["hit", "miss"]
    deliveries = [s for s in receiver.spans if s.name == "webhook.delivery"]
    assert deliveries and {(attributes(s)["sidecar.webhook"], attributes(s)["sidecar.event"]) for s in deliveries} \
        == {("erp", "paid")}
    assert all(s.parent_span_id == b"" for s in deliveries)  # a trace of its own
    assert token not in json.dumps([attributes(s) for s in receiver.spans], default=str)
