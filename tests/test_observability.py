"""Observability (issue 16, SPEC §13): version, build info, in-flight gauge, status classes, process metrics,
the metrics-only port."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from sidecar import __version__
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
    assert 'sidecar_requests_total{decision="allow",route="all",status_class="2xx"} 1.0' in after
    assert 'sidecar_requests_total{decision="deny",route="locked",status_class="4xx"} 1.0' in after
    assert 'sidecar_requests_total{decision="allow",route="slow",status_class="2xx"} 1.0' in after
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
    assert 'sidecar_requests_total{decision="allow",route="all",status_class="2xx"} 4.0' in text
    assert admin.status_code == 404
    assert healthz.status_code == 404
    for series in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                   "process_start_time_seconds"):
        samples = [line for line in text.splitlines() if line.startswith(series + " ")]
        assert len(samples) == 1, series
    assert "sidecar_build_info{" in text
