"""Operations: reload without downtime, graceful shutdown, several workers, metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from sidecar.state.client_token_store import new_token, token_hash
from sidecar.testing import KeyPair, SidecarProcess, free_port, recording_upstream, running_sidecar, serve_in_thread

ADMIN = "ops-admin-token-0123456789abcdef"


def config(upstream: str, routes: list[dict]) -> str:
    return json.dumps({
        "version": 1, "upstream": upstream, "admin": {"token": ADMIN},
        "authenticators": {"public": {"type": "anonymous"}},
        "routes": routes,
    })


def route(route_id: str, path: str) -> dict:
    return {"id": route_id, "match": {"path": path}, "auth": ["public"]}


def wait_status(url: str, status: int, within: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if httpx.get(url).status_code == status:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer {status} within {within} s")


def test_route_added_to_the_file_is_served_after_a_change():
    """A route added to the file is served within seconds of the change (the file is watched)."""
    with recording_upstream() as up, running_sidecar(config(up.url, [route("a", "/a/**")])) as sc:
        assert httpx.get(sc.url + "/b/1").status_code == 404
        sc.config_path.write_text(config(up.url, [route("a", "/a/**"), route("b", "/b/**")]))
        assert wait_status(sc.url + "/b/1", 200, within=5) < 5


def test_configmap_symlink_swap_is_picked_up(tmp_path: Path):
    """A ConfigMap-style update (the `..data` symlink swapped to a new directory) reloads the policy."""
    with recording_upstream() as up:
        first, second = tmp_path / "v1", tmp_path / "v2"
        first.mkdir()
        second.mkdir()
        (first / "sidecar.yaml").write_text(config(up.url, [route("a", "/a/**")]))
        (second / "sidecar.yaml").write_text(config(up.url, [route("a", "/a/**"), route("c", "/c/**")]))
        (tmp_path / "..data").symlink_to(first)
        (tmp_path / "sidecar.yaml").symlink_to(tmp_path / "..data" / "sidecar.yaml")
        with SidecarProcess(tmp_path / "sidecar.yaml") as sc:
            assert httpx.get(sc.url + "/c/1").status_code == 404
            (tmp_path / "..data_tmp").symlink_to(second)
            os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
            assert wait_status(sc.url + "/c/1", 200, within=5) < 5


def test_sighup_reloads_and_a_broken_file_keeps_the_old_policy(tmp_path: Path):
    """SIGHUP reloads; a broken file is refused, the process lives on and the old routes keep working."""
    with recording_upstream() as up:
        path = tmp_path / "sidecar.yaml"
        path.write_text(config(up.url, [route("a", "/a/**")]))
        with SidecarProcess(path) as sc:
            path.write_text("version: 1\nupstream: [not, a, url]\nroutes: {}\n")
            sc.process.send_signal(signal.SIGHUP)
            time.sleep(1.5)
            assert sc.process.poll() is None
            assert httpx.get(sc.url + "/a/1").status_code == 200
            path.write_text(config(up.url, [route("a", "/a/**"), route("d", "/d/**")]))
            sc.process.send_signal(signal.SIGHUP)
            assert wait_status(sc.url + "/d/1", 200, within=5) < 5


def test_admin_reload_reports_errors_and_keeps_old_policy():
    """POST /admin/reload with a broken file answers 400 with the errors; the old routes keep working."""
    with recording_upstream() as up, running_sidecar(config(up.url, [route("a", "/a/**")])) as sc:
        good = sc.config_path.read_text()
        sc.services._config_stamp = None  # the watcher would reload too; this test drives the API
        sc.config_path.write_text(good.replace('"version": 1', '"version": 1, "typo_key": 1'))
        response = httpx.post(sc.admin_url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
        assert response.status_code == 400
        assert any("typo_key" in error for error in response.json()["errors"])
        assert httpx.get(sc.url + "/a/1").status_code == 200
        assert httpx.post(sc.admin_url + "/admin/reload").status_code == 401


def test_admin_refuses_an_oversized_body_before_it_has_all_arrived():
    """An admin body over the limit is refused as soon as the limit is passed, not after the whole body is read."""
    with recording_upstream() as up, running_sidecar(config(up.url, [route("a", "/a/**")])) as sc:
        port = int(sc.admin_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"POST /admin/identifiers HTTP/1.1\r\nHost: admin\r\n"
                         b"Authorization: Bearer " + ADMIN.encode() + b"\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 50000000\r\n\r\n")
            conn.sendall(b" " * (2 * 1024 * 1024))  # past the 1 MiB limit; the other 48 MB never come
            reply = conn.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b'"payload_too_large"' in reply


def slow_upstream(delay: float):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await __import__("asyncio").sleep(delay)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"finished"})
    return app


def test_request_in_flight_at_sigterm_completes(tmp_path: Path):
    """A request in flight when SIGTERM arrives completes with its real answer, and the process exits 0."""
    with serve_in_thread(slow_upstream(1.5)) as upstream_url:
        path = tmp_path / "sidecar.yaml"
        path.write_text(config(upstream_url, [route("all", "/**")]))
        sc = SidecarProcess(path, grace=10)
        result: dict = {}

        def call() -> None:
            response = httpx.get(sc.url + "/slow", timeout=10)
            result.update(status=response.status_code, body=response.text)

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.5)
        sc.process.send_signal(signal.SIGTERM)
        thread.join(10)
        assert result == {"status": 200, "body": "finished"}
        assert sc.process.wait(10) == 0
        sc.stop()


def test_two_workers_serve_and_share_one_metrics_scrape(tmp_path: Path):
    """With --workers 2 every request is answered correctly and one scrape counts the requests of both."""
    with recording_upstream() as up:
        path = tmp_path / "sidecar.yaml"
        path.write_text(config(up.url, [route("all", "/**")]))
        with SidecarProcess(path, workers=2) as sc:
            with httpx.Client() as client:  # new connections spread over both workers
                for i in range(40):
                    response = client.get(f"{sc.url}/n/{i}", headers={"Connection": "close"})
                    assert response.status_code == 200
                    assert response.json()["path"] == f"/n/{i}"
            pids = {r.header("x-forwarded-for") for r in up.received}
            assert pids == {"127.0.0.1"}
            # Each worker folds its counts in at least every second: one scrape sees all 40 soon after.
            deadline = time.monotonic() + 3
            total = 0.0
            while time.monotonic() < deadline and total < 40:
                text = httpx.get(sc.admin_url + "/metrics").text
                total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                            if line.startswith('sidecar_requests_total{') and 'route="all"' in line)
                time.sleep(0.2)
            assert total == 40


def test_metrics_have_the_spec_series_and_no_credential():
    """/metrics has the SPEC §9 series, labelled by route id and decision, and never a credential or path."""
    secret = "Bearer super-secret-token-value"
    with recording_upstream() as up:
        cfg = json.loads(config(up.url, [route("all", "/**")]))
        cfg["authenticators"]["idp"] = {"type": "jwt", "secret": "x" * 40}
        cfg["routes"].insert(0, {"id": "guarded", "match": {"path": "/guarded/**"}, "auth": ["idp"]})
        with running_sidecar(json.dumps(cfg)) as sc:
            httpx.get(sc.url + "/x/secret-path-segment")
            httpx.get(sc.url + "/guarded/1", headers={"Authorization": secret})
            text = httpx.get(sc.admin_url + "/metrics").text
    for series in ("sidecar_requests_total", "sidecar_request_duration_seconds", "sidecar_auth_cache_total",
                   "sidecar_webhook_deliveries_total", "sidecar_upstream_errors_total"):
        assert series in text
    assert 'sidecar_requests_total{decision="allow",mode="proxy",route="all",status_class="2xx"} 1.0' in text
    assert 'sidecar_requests_total{decision="deny",mode="proxy",route="guarded",status_class="4xx"} 1.0' in text
    assert "super-secret" not in text
    assert "secret-path-segment" not in text


def _start_call(url: str, result: dict) -> threading.Thread:
    def call() -> None:
        try:
            response = httpx.get(url, timeout=15)
            result.update(status=response.status_code, body=response.text,
                          content_type=response.headers.get("content-type"))
        except httpx.HTTPError as exc:
            result.update(error=type(exc).__name__)

    thread = threading.Thread(target=call)
    thread.start()
    return thread


def test_two_workers_refuse_new_connections_while_draining(tmp_path: Path):
    """With --workers 2, a connection tried after SIGTERM is refused at once while the in-flight request finishes."""
    with serve_in_thread(slow_upstream(4)) as upstream_url:
        path = tmp_path / "sidecar.yaml"
        path.write_text(config(upstream_url, [route("all", "/**")]))
        sc = SidecarProcess(path, workers=2, grace=10)
        result: dict = {}
        thread = _start_call(sc.url + "/slow", result)
        time.sleep(0.7)
        sc.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        try:
            refused_after = None
            while refused_after is None and time.monotonic() - signalled < 3:
                try:
                    socket.create_connection(("127.0.0.1", sc.port), timeout=1).close()
                    time.sleep(0.05)
                except ConnectionRefusedError:
                    refused_after = time.monotonic() - signalled
            assert refused_after is not None and refused_after < 1.5  # the slow request runs ~3 s longer
            assert "status" not in result
            thread.join(15)
            assert result == {"status": 200, "body": "finished", "content_type": "text/plain"}
            assert sc.process.wait(15) == 0
        finally:
            sc.stop()


def test_request_cut_off_by_the_grace_period_gets_the_json_503(tmp_path: Path):
    """A request still waiting for the upstream when --grace runs out is answered 503 shutting_down in JSON."""
    with serve_in_thread(slow_upstream(4)) as upstream_url:
        path = tmp_path / "sidecar.yaml"
        path.write_text(config(upstream_url, [route("all", "/**")]))
        sc = SidecarProcess(path, grace=1)
        result: dict = {}
        thread = _start_call(sc.url + "/slow", result)
        time.sleep(0.5)
        sc.process.send_signal(signal.SIGTERM)
        thread.join(15)
        try:
            assert result["status"] == 503
            assert result["content_type"] == "application/json"
            assert json.loads(result["body"])["error"] == "shutting_down"
            assert set(json.loads(result["body"])) == {"error", "error_description"}
            assert sc.process.wait(15) == 0
        finally:
            sc.stop()


def streaming_upstream(pause: float):
    """Sends its head and a first chunk, then pauses before the rest."""
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"first part;", "more_body": True})
        await __import__("asyncio").sleep(pause)
        await send({"type": "http.response.body", "body": b"second part", "more_body": False})
    return app


def test_response_streaming_when_the_grace_period_ends_is_cut_short_not_completed(tmp_path: Path):
    """A reply already streaming when --grace runs out is cut off by closing, never made to look complete."""
    with serve_in_thread(streaming_upstream(4)) as upstream_url:
        path = tmp_path / "sidecar.yaml"
        path.write_text(config(upstream_url, [route("all", "/**")]))
        sc = SidecarProcess(path, grace=1)
        try:
            with socket.create_connection(("127.0.0.1", sc.port), timeout=10) as sock:
                sock.sendall(b"GET /stream HTTP/1.1\r\nHost: sidecar.test\r\n\r\n")
                received = sock.recv(65536)
                assert received.startswith(b"HTTP/1.1 200 ")
                sc.process.send_signal(signal.SIGTERM)
                while chunk := sock.recv(65536):
                    received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            assert b"transfer-encoding: chunked" in head.lower()
            assert b"first part;" in body
            assert b"second part" not in body
            assert not body.endswith(b"0\r\n\r\n")  # no last-chunk: the client knows the body is incomplete
            assert sc.process.wait(15) == 0
        finally:
            sc.stop()


@pytest.mark.parametrize("taken", ["--port", "--admin-port"])
def test_run_on_a_port_in_use_says_so_in_one_line_and_exits_1(tmp_path: Path, taken: str):
    """`sidecar run` on a port already in use prints one line naming the host and port, no traceback; exit 1."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(config("http://127.0.0.1:9", [route("all", "/**")]))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        ports = {"--port": str(free_port()), "--admin-port": str(free_port()), taken: str(busy)}
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "run", "--config", str(path), "--host", "127.0.0.1",
             "--port", ports["--port"], "--admin-port", ports["--admin-port"]],
            capture_output=True, text=True, timeout=30,
        )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"sidecar: cannot listen on 127.0.0.1:{busy} ({taken}): the address is already in use\n"


# -- what a reload changes, and what it refuses (issue 12, items 2 and 9) ---------------------------------------

TOKEN_A1, TOKEN_A2, TOKEN_B = new_token(), new_token(), new_token()


def tokens_config(upstream: str, clients: list[dict], extra_routes: list[dict] | None = None) -> str:
    cfg = json.loads(config(upstream, [{"id": "api", "match": {"path": "/api/**"}, "auth": ["tokens"]},
                                       *(extra_routes or [])]))
    cfg["authenticators"]["tokens"] = {"type": "client_token"}
    cfg["clients"] = clients
    return json.dumps(cfg)


def client(client_id: str, *tokens: str) -> dict:
    return {"id": client_id, "tokens": [f"sha256:{token_hash(t)}" for t in tokens]}


def admin_reload(sc) -> httpx.Response:
    return httpx.post(sc.admin_url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})


def status_with(url: str, token: str) -> int:
    return httpx.get(url, headers={"X-Client-Token": token}).status_code


def test_token_or_client_removed_by_a_reload_is_refused_at_once_despite_the_cache():
    """Tokens accepted (their verdicts cached); a reload removes one token and one client: both are 401 on the very
    next request, not when their cached verdicts expire; the token left in place still works."""
    with recording_upstream() as up:
        first = tokens_config(up.url, [client("a", TOKEN_A1, TOKEN_A2), client("b", TOKEN_B)])
        with running_sidecar(first) as sc:
            for token in (TOKEN_A1, TOKEN_A2, TOKEN_B):
                assert status_with(sc.url + "/api/1", token) == 200
                assert status_with(sc.url + "/api/2", token) == 200  # served from the verdict cache
            sc.config_path.write_text(tokens_config(up.url, [client("a", TOKEN_A1)]))
            assert admin_reload(sc).status_code == 200
            assert status_with(sc.url + "/api/3", TOKEN_A2) == 401
            assert status_with(sc.url + "/api/3", TOKEN_B) == 401
            assert status_with(sc.url + "/api/3", TOKEN_A1) == 200
    assert [r.header("x-auth-client") for r in up.received] == ["a", "a", "a", "a", "b", "b", "a"]


def test_client_removed_by_sighup_reload_is_refused_at_once(tmp_path: Path):
    """The same through SIGHUP in a real process: once the new file is in force, the removed client's cached
    token is refused on its next request."""
    marker = {"id": "marker", "match": {"path": "/marker/**"}, "auth": ["public"]}
    with recording_upstream() as up:
        path = tmp_path / "sidecar.yaml"
        path.write_text(tokens_config(up.url, [client("a", TOKEN_A1), client("b", TOKEN_B)]))
        with SidecarProcess(path) as sc:
            assert status_with(sc.url + "/api/1", TOKEN_B) == 200
            assert status_with(sc.url + "/api/2", TOKEN_B) == 200
            path.write_text(tokens_config(up.url, [client("a", TOKEN_A1)], [marker]))
            sc.process.send_signal(signal.SIGHUP)
            wait_status(sc.url + "/marker/1", 200, within=5)  # the new file is in force
            assert status_with(sc.url + "/api/3", TOKEN_B) == 401
            assert status_with(sc.url + "/api/3", TOKEN_A1) == 200


def test_reload_applies_new_upstream_timeouts():
    """A reload that shortens `timeouts.read` makes a slow upstream a 504 at once; lengthening it again gives 200."""
    with serve_in_thread(slow_upstream(1.0)) as upstream_url:
        cfg = json.loads(config(upstream_url, [route("all", "/**")]))
        with running_sidecar(json.dumps({**cfg, "timeouts": {"read": "10s"}})) as sc:
            assert httpx.get(sc.url + "/slow", timeout=10).status_code == 200
            sc.config_path.write_text(json.dumps({**cfg, "timeouts": {"read": "200ms"}}))
            assert admin_reload(sc).status_code == 200
            reply = httpx.get(sc.url + "/slow", timeout=10)
            assert (reply.status_code, reply.json()["error"]) == (504, "upstream_timeout")
            sc.config_path.write_text(json.dumps({**cfg, "timeouts": {"read": "10s"}}))
            assert admin_reload(sc).status_code == 200
            assert httpx.get(sc.url + "/slow", timeout=10).status_code == 200


def test_upstream_failures_are_audited_as_error(capsys: pytest.CaptureFixture[str]):
    """An upstream that is down (502) or too slow (504) is audited `decision: error`, not `deny`; a 404 is a deny."""
    with serve_in_thread(slow_upstream(1.0)) as slow_url:
        slow = json.loads(config(slow_url, [route("slow", "/**")]))
        with running_sidecar(json.dumps({**slow, "timeouts": {"read": "200ms"}})) as sc:
            timed_out = httpx.get(sc.url + "/slow", headers={"x-request-id": "audit-504"}, timeout=10)
    with running_sidecar(config(f"http://127.0.0.1:{free_port()}", [route("down", "/api/**")])) as sc:
        unreachable = httpx.get(sc.url + "/api/x", headers={"x-request-id": "audit-502"})
        no_route = httpx.get(sc.url + "/elsewhere", headers={"x-request-id": "audit-404"})
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    audited = {x["request_id"]: (x["decision"], x["reason"], x["status"]) for x in lines if "request_id" in x}

    assert [r.status_code for r in (timed_out, unreachable, no_route)] == [504, 502, 404]
    assert audited["audit-504"] == ("error", "upstream_timeout", 504)
    assert audited["audit-502"] == ("error", "upstream_unavailable", 502)
    assert audited["audit-404"] == ("deny", "no_route", 404)


def test_reload_applies_new_cache_ttl():
    """A reload that turns the verdict cache off (`cache.ttl: 0s`) means the next request asks the validator
    again: a credential the validator no longer accepts is refused at once."""
    answers = {"current": "1"}

    async def validator(scope, receive, send):
        body = answers["current"].encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1")]})
        await send({"type": "http.response.body", "body": body})

    with recording_upstream() as up, serve_in_thread(validator) as validator_url:
        cfg = json.loads(config(up.url, [{"id": "r", "match": {"path": "/r/**"}, "auth": ["remote"]}]))
        cfg["authenticators"]["remote"] = {"type": "remote", "from": ["query:token"], "url": validator_url + "/v"}
        with running_sidecar(json.dumps(cfg)) as sc:
            assert httpx.get(sc.url + "/r/1?token=t").status_code == 200
            answers["current"] = "0"
            assert httpx.get(sc.url + "/r/2?token=t").status_code == 200  # the cached yes (cache.ttl 300s)
            sc.config_path.write_text(json.dumps({**cfg, "cache": {"ttl": "0s"}}))
            assert admin_reload(sc).status_code == 200
            assert httpx.get(sc.url + "/r/3?token=t").status_code == 401


def test_reload_changing_a_restart_key_is_refused_as_a_whole():
    """A file changing `redis:` or `issuer.signing_key` is refused by POST /admin/reload with 409, naming the key
    and saying to restart; nothing of it applies (its new route is not served, the old key still signs)."""
    old_key, new_key = KeyPair(), KeyPair()
    with recording_upstream() as up:
        cfg = json.loads(config(up.url, [route("a", "/a/**")]))
        cfg["issuer"] = {"signing_key": old_key.private_pem}
        with running_sidecar(json.dumps(cfg)) as sc:
            jwks = httpx.get(sc.url + "/_sidecar/.well-known/jwks.json").json()
            changes = {"redis": {"redis": "redis://127.0.0.1:1/0"},
                       "issuer.signing_key": {"issuer": {"signing_key": new_key.private_pem}}}
            for key, change in changes.items():
                changed = {**cfg, **change, "routes": [*cfg["routes"], route("b", "/b/**")]}
                sc.config_path.write_text(json.dumps(changed))
                reply = admin_reload(sc)
                assert reply.status_code == 409
                body = reply.json()
                assert body["reloaded"] is False
                assert body["restart_required"] == [key]
                assert f"{key}: changing {key} needs a restart" in body["errors"][0]
                assert "the reload was refused" in body["errors"][0]
                assert httpx.get(sc.url + "/b/1").status_code == 404
                assert httpx.get(sc.url + "/a/1").status_code == 200
                assert httpx.get(sc.url + "/_sidecar/.well-known/jwks.json").json() == jwks
            sc.config_path.write_text(json.dumps({**cfg, "routes": [*cfg["routes"], route("b", "/b/**")]}))
            assert admin_reload(sc).status_code == 200
            assert httpx.get(sc.url + "/b/1").status_code == 200


def test_sighup_reload_changing_redis_is_refused_with_a_log_line(tmp_path: Path):
    """On SIGHUP, a file changing `redis:` is refused: the old configuration stays and the log line names the key
    and says to restart."""
    with recording_upstream() as up:
        path = tmp_path / "sidecar.yaml"
        path.write_text(config(up.url, [route("a", "/a/**")]))
        sc = SidecarProcess(path)
        try:
            changed = json.loads(config(up.url, [route("a", "/a/**"), route("d", "/d/**")]))
            path.write_text(json.dumps({**changed, "redis": "redis://127.0.0.1:1/0"}))
            sc.process.send_signal(signal.SIGHUP)
            time.sleep(2.5)  # the SIGHUP and the file watcher both had their turn
            assert httpx.get(sc.url + "/d/1").status_code == 404
            assert httpx.get(sc.url + "/a/1").status_code == 200
        finally:
            sc.process.send_signal(signal.SIGTERM)
            sc.process.wait(15)
            log = sc.process.stderr.read().decode() if sc.process.stderr else ""
            sc.stop()
    refused = [line for line in log.splitlines() if "reload refused" in line]
    assert refused, log
    assert "redis: changing redis needs a restart" in refused[0]
    assert "redis://" not in log  # the URL (it may carry a password) is never printed
