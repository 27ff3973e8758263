"""Observability (issue 16, SPEC §13): version, build info, in-flight gauge, status classes, process metrics,
the metrics-only port."""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jwt

from sidecar import __version__
from sidecar.state.client_token_store import new_token, token_hash
from sidecar.testing import SidecarProcess, free_port, recording_upstream, running_sidecar, serve_in_thread
from tests.test_operations import config, route, slow_upstream


def test_version_flag_prints_the_package_version():
    """`sidecar --version` prints `sidecar <version>` and exits 0."""
    done = subprocess.run([sys.executable, "-m", "sidecar", "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert done.stdout.strip() == f"sidecar {__version__}"


def test_build_info_status_classes_and_in_flight_gauge():
    """/metrics has sidecar_build_info{version,python}, a status_class on the request counter, and counts a
    request in flight while the upstream is still answering."""
    with serve_in_thread(slow_upstream(1.5)) as slow_url, recording_upstream() as up:
        cfg = json.loads(config(up.url, [route("all", "/**")]))
        cfg["routes"].insert(0, {**route("slow", "/slow/**"), "upstream": slow_url})
        cfg["routes"].insert(0, {"id": "locked", "match": {"path": "/locked/**"}, "auth": ["idp"]})
        cfg["authenticators"]["idp"] = {"type": "jwt", "secret": "s" * 40}
        with running_sidecar(cfg) as sc:
            assert httpx.get(sc.url + "/ok").status_code == 200
            assert httpx.get(sc.url + "/locked/1").status_code == 401
            thread = threading.Thread(target=httpx.get, args=(sc.url + "/slow/1",), kwargs={"timeout": 10})
            thread.start()
            time.sleep(0.5)
            during = httpx.get(sc.admin_url + "/metrics").text
            thread.join()
            after = httpx.get(sc.admin_url + "/metrics").text
    python = platform.python_version()
    assert f'sidecar_build_info{{python="{python}",version="{__version__}"}} 1.0' in during
    assert "sidecar_in_flight_requests 1.0" in during
    assert "sidecar_in_flight_requests 0.0" in after
    assert 'sidecar_requests_total{decision="allow",mode="proxy",route="all",status_class="2xx"} 1.0' in after
    assert 'sidecar_requests_total{decision="deny",mode="proxy",route="locked",status_class="4xx"} 1.0' in after
    assert 'sidecar_requests_total{decision="allow",mode="proxy",route="slow",status_class="2xx"} 1.0' in after
    assert "process_cpu_seconds_total" in after


def test_metrics_port_serves_only_metrics_and_process_series_under_workers(tmp_path: Path):
    """`--metrics-port` serves /metrics (summed over --workers 2, with the process_* series once) and nothing
    else: the admin API is not reachable there."""
    metrics_port = free_port()
    with recording_upstream() as up:
        path = tmp_path / "sidecar.yaml"
        path.write_text(config(up.url, [route("all", "/**")]))
        with SidecarProcess(path, workers=2, args=["--metrics-port", str(metrics_port)]) as sc:
            for _ in range(4):
                assert httpx.get(sc.url + "/x", headers={"Connection": "close"}).status_code == 200
            metrics_url = f"http://127.0.0.1:{metrics_port}"
            deadline = time.monotonic() + 5
            text = ""
            while time.monotonic() < deadline and 'status_class="2xx"} 4.0' not in text:
                time.sleep(0.2)
                text = httpx.get(metrics_url + "/metrics").text
            admin = httpx.get(metrics_url + "/admin/clients", headers={"Authorization": "Bearer ops-admin-token"})
            healthz = httpx.get(metrics_url + "/healthz")
    assert 'sidecar_requests_total{decision="allow",mode="proxy",route="all",status_class="2xx"} 4.0' in text
    assert admin.status_code == 404
    assert healthz.status_code == 404
    for series in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                   "process_start_time_seconds"):
        samples = [line for line in text.splitlines() if line.startswith(series + " ")]
        assert len(samples) == 1, series
    assert "sidecar_build_info{" in text


ADMIN = "ops-admin-token-0123456789abcdef"
CLIENT_TOKEN = new_token()
REMOTE_TOKEN = "remote-credential-9f8e7d6c5b4a"
JWT_SECRET = "jwt-hs256-secret-that-is-long-enough-0123456789"


def logging_config(upstream: str) -> dict:
    dead = free_port()
    return {
        "version": 1, "upstream": upstream, "admin": {"token": ADMIN},
        "authenticators": {
            "public": {"type": "anonymous"},
            "partner": {"type": "jwt", "jwks_url": f"http://127.0.0.1:{dead}/jwks.json"},
            "hs": {"type": "jwt", "secret": JWT_SECRET, "from": ["header:Authorization", "query:access_token"]},
            "tokens": {"type": "client_token"},
            "portal": {"type": "remote", "from": ["query:token"], "allow_private": True, "timeout": "300ms",
                       "url": f"http://127.0.0.1:{dead}/valida_token?token={{value}}", "response": "boolean"},
        },
        "clients": [{"id": "c1", "tokens": [f"sha256:{token_hash(CLIENT_TOKEN)}"]}],
        "routes": [
            {"id": "probe", "match": {"path": "/healthz"}, "auth": ["public"], "audit": False},
            {"id": "partner", "match": {"path": "/partner/**"}, "auth": ["partner"]},
            {"id": "hs", "match": {"path": "/hs/**"}, "auth": ["hs"]},
            {"id": "tokens", "match": {"path": "/tokens/**"}, "auth": ["tokens"]},
            {"id": "portal", "match": {"path": "/portal/**"}, "auth": ["portal"]},
        ],
    }


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_operational_logs_are_json_lines_with_levels_and_no_credential(tmp_path: Path):
    """Start, failed JWKS fetch, reload, refused reload and shutdown are JSON lines with the right level; audit
    lines carry level, user_agent and response_bytes; an `audit: false` route writes none; no credential
    appears anywhere, even at --log-level debug."""
    hs_token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 300}, JWT_SECRET, algorithm="HS256")
    with recording_upstream() as up:
        path = tmp_path / "sidecar.yaml"
        cfg = logging_config(up.url)
        path.write_text(json.dumps(cfg))
        sc = SidecarProcess(path, args=["--log-level", "debug"], stdout=subprocess.PIPE)
        try:
            assert httpx.get(sc.url + "/healthz").status_code == 200
            assert httpx.get(sc.url + "/hs/1", headers={"Authorization": f"Bearer {hs_token}",
                                                        "User-Agent": "probe/1.0 " + "x" * 400}).status_code == 200
            assert httpx.get(sc.url + "/hs/2", params={"access_token": hs_token}).status_code == 200
            assert httpx.get(sc.url + "/tokens/1", headers={"X-Client-Token": CLIENT_TOKEN}).status_code == 200
            assert httpx.get(sc.url + "/tokens/1", headers={"X-Client-Token": CLIENT_TOKEN + "x"}).status_code == 401
            assert httpx.get(sc.url + "/portal/1", params={"token": REMOTE_TOKEN}).status_code == 503
            cfg["routes"].append({"id": "extra", "match": {"path": "/extra/**"}, "auth": ["public"]})
            path.write_text(json.dumps(cfg))
            sc.process.send_signal(signal.SIGHUP)
            time.sleep(1.0)
            path.write_text("version: 1\nupstream: [not, a, url]\n")
            sc.process.send_signal(signal.SIGHUP)
            time.sleep(1.0)
            sc.process.send_signal(signal.SIGTERM)
            out, err = sc.process.communicate(timeout=20)
        finally:
            sc.stop()
    logs, audit = json_lines(err.decode()), json_lines(out.decode())
    for line in logs:
        assert set(line) >= {"time", "level", "logger", "message"}
    by_message = {line["message"]: line for line in logs}
    started = by_message["sidecar started"]
    assert started["level"] == "info"
    assert started["routes"] == 5 and started["authenticators"] == 5 and started["workers"] == 1
    assert started["config_file"] == str(path) and started["redis"] == "in-process"
    assert started["listen"]["main"] == f"127.0.0.1:{sc.port}" and started["version"] == __version__
    assert any(line["level"] == "warning" and line["message"].startswith("jwks fetch from") for line in logs)
    assert by_message["configuration reloaded"]["level"] == "info"
    assert by_message["configuration reloaded"]["routes"] == 6
    assert any(line["level"] == "warning" and line["message"].startswith("reload refused") for line in logs)
    stopped = by_message["sidecar stopped"]
    assert stopped["level"] == "info" and stopped["reason"] == "SIGTERM" and stopped["cut_off"] == 0
    requests = [line for line in audit if "request_id" in line]
    assert [line["route"] for line in requests] == ["hs", "hs", "tokens", "tokens", "portal"]
    assert [line["level"] for line in requests] == ["info", "info", "info", "warning", "error"]
    assert requests[0]["user_agent"] == ("probe/1.0 " + "x" * 400)[:256]
    assert requests[0]["response_bytes"] > 0 and requests[3]["response_bytes"] > 0
    everything = out.decode() + err.decode()
    for secret in (hs_token, CLIENT_TOKEN, REMOTE_TOKEN, JWT_SECRET, ADMIN, hs_token.split(".")[2]):
        assert secret not in everything


def test_log_format_text_is_one_readable_line_per_record(tmp_path: Path):
    """`--log-format text` prints `time LEVEL logger: message key=value` lines, not JSON."""
    with recording_upstream() as up:
        path = tmp_path / "sidecar.yaml"
        path.write_text(config(up.url, [route("all", "/**")]))
        sc = SidecarProcess(path, args=["--log-format", "text"])
        sc.process.send_signal(signal.SIGTERM)
        _, err = sc.process.communicate(timeout=20)
        sc.stop()
    lines = err.decode().splitlines()
    started = next(line for line in lines if "sidecar started" in line)
    assert " INFO    sidecar: sidecar started version=" in started
    assert "routes=1 " in started and "redis=in-process" in started
    assert any(" INFO    sidecar: sidecar stopped reason=SIGTERM" in line for line in lines)
    assert not any(line.startswith("{") for line in lines)
