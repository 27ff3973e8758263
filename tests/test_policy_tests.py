"""`sidecar test` (offline policy tests) and report-only routes (issue 18)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import bearer, jwt_authenticator, make_config, mint, route

from sidecar.cli import main
from sidecar.testing import KeyPair, recording_upstream, running_sidecar

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["test", *args])
    return code, capsys.readouterr().out


def test_shipped_policy_tests_pass(capsys: pytest.CaptureFixture[str]):
    """Every shipped policy has a tests file beside it, and all their cases pass: one line each, then the count."""
    tests = sorted(POLICIES.glob("*.tests.yaml"))
    assert {t.name.removesuffix(".tests.yaml") for t in tests} == {p.stem for p in POLICIES.glob("*.yaml")
                                                                   if not p.name.endswith(".tests.yaml")}
    code, out = run_cli([str(t) for t in tests], capsys)
    lines = out.splitlines()
    assert code == 0, out
    assert all(line.startswith("PASS  ") for line in lines[:-1])
    assert lines[-1] == f"{len(lines) - 1} passed, 0 failed"


def test_policy_tests_open_no_socket(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """`sidecar test` connects to nothing: every case passes with socket.connect made to fail."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("sidecar test opened a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    code, out = run_cli([str(t) for t in sorted(POLICIES.glob("*.tests.yaml"))], capsys)
    assert code == 0, out
    assert "0 failed" in out


def _broken_copy(tmp_path: Path, name: str, edit: Any) -> Path:
    policy = tmp_path / f"{name}.yaml"
    policy.write_text(edit((POLICIES / f"{name}.yaml").read_text()))
    shutil.copy(POLICIES / f"{name}.tests.yaml", tmp_path / f"{name}.tests.yaml")
    return tmp_path / f"{name}.tests.yaml"


def test_a_removed_scope_fails_the_cases_that_expect_a_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """With the scope requirement removed from a route, the case expecting 403 fails and says what happened."""
    tests = _broken_copy(tmp_path, "totvs_client_credentials",
                         lambda text: text.replace("    require: {scopes: [/btb]}\n", ""))
    code, out = run_cli([str(tests)], capsys)
    assert code == 1
    assert "FAIL  " in out and ":: a token without /btb is refused" in out
    assert "status: expected 403, got 200" in out
    assert "why (sidecar explain):" in out and "route btb: MATCH" in out
    assert out.splitlines()[-1] == "2 passed, 1 failed"


def test_a_lenient_route_moved_first_fails_naming_the_route_that_matched(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]):
    """A catch-all public route moved above a strict one shadows it: the failing cases name the route that matched."""
    def shadow(text: str) -> str:
        lenient = "  - id: health                   # open to anyone\n    match: {methods: [GET], path: /public/**}\n"
        assert lenient in text
        text = text.replace(lenient, "")
        return text.replace("routes:\n", "routes:\n  - id: health\n    match: {path: /**}\n", 1)

    tests = _broken_copy(tmp_path, "demo", shadow)
    junit = tmp_path / "junit.xml"
    code, out = run_cli(["--junit", str(junit), str(tests)], capsys)
    assert code == 1
    assert "route: expected 'invoices', but the request matched route 'health' instead" in out
    assert "route health: MATCH" in out  # explain's account
    suite = ET.parse(junit).getroot()
    assert int(suite.get("failures", "0")) >= 1
    failure = suite.find(".//testcase/failure")
    assert failure is not None and "matched route 'health' instead" in (failure.get("message") or "")


def test_coverage_lists_what_no_case_reached(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """--coverage names the routes and authenticators no case reached."""
    tests = tmp_path / "few.tests.yaml"
    tests.write_text(f"policy: {POLICIES / 'demo.yaml'}\ncases:\n"
                     "  - {name: public, request: {url: /public/x}, expect: {status: 200}}\n")
    code, out = run_cli(["--coverage", str(tests)], capsys)
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("coverage "))
    assert "routes no case reached: invoices, payments, transactions, reports, reader, portal" in line
    assert "authenticators no case reached: demo_idp, licence_token, reader_key, valida_token" in line


def test_a_case_with_an_unknown_expectation_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A typo in a case is a failure, never a silent pass."""
    tests = tmp_path / "typo.tests.yaml"
    tests.write_text(f"policy: {POLICIES / 'demo.yaml'}\ncases:\n"
                     "  - {name: typo, request: {url: /public/x}, expect: {stauts: 200}}\n")
    code, out = run_cli([str(tests)], capsys)
    assert code == 1 and "unknown expectation(s) ['stauts']" in out


def test_the_console_command_exits_non_zero_on_a_failure(tmp_path: Path):
    """`python -m sidecar test` exits 1 when a case fails and prints the closing count."""
    tests = tmp_path / "f.tests.yaml"
    tests.write_text(f"policy: {POLICIES / 'demo.yaml'}\ncases:\n"
                     "  - {name: wrong, request: {url: /api/invoices/1}, expect: {status: 200}}\n")
    done = subprocess.run([sys.executable, "-m", "sidecar", "test", str(tests)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1] == "0 passed, 1 failed"


# --- report-only --------------------------------------------------------------------------------------------------


def test_report_only_route_forwards_what_it_would_refuse(idp_keys: KeyPair, capsys: pytest.CaptureFixture[str]):
    """On a report-only route a refused request is forwarded anyway: audited would_deny with its reason, counted
    per route and reason, its credential stripped and no identity headers; an accepted one carries its identity."""
    with recording_upstream() as upstream:
        cfg = make_config(upstream.url, {"idp": jwt_authenticator(idp_keys)},
                          [route("legacy", "/legacy/**", ["idp"], mode="report_only",
                                 require={"scopes": ["legacy:read"]})])
        with running_sidecar(cfg) as sc:
            ready = httpx.get(sc.admin_url + "/readyz").json()
            forged = httpx.get(sc.url + "/legacy/a", headers={"authorization": "Bearer not.a.jwt",
                                                              "x-request-id": "ro-forged"})
            forged_seen = upstream.last
            scoped_out = httpx.get(sc.url + "/legacy/b", headers={**bearer(mint(idp_keys, sub="ann")),
                                                                  "x-request-id": "ro-scope"})
            scoped_seen = upstream.last
            good = httpx.get(sc.url + "/legacy/c", headers={**bearer(mint(idp_keys, sub="bob", scope="legacy:read")),
                                                            "x-request-id": "ro-good"})
            metrics = httpx.get(sc.admin_url + "/metrics").text
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    audited = {x["request_id"]: x for x in lines if "request_id" in x}

    assert ready["report_only_routes"] == 1
    assert (forged.status_code, scoped_out.status_code, good.status_code) == (200, 200, 200)
    assert forged_seen.path == "/legacy/a" and forged_seen.header("authorization") is None
    assert all(not k.startswith("x-auth-") for k, _ in forged_seen.headers)
    assert audited["ro-forged"]["decision"] == "would_deny"
    assert audited["ro-forged"]["reason"] == "invalid_token"
    assert scoped_seen.header("authorization") is None and scoped_seen.header("x-auth-subject") == "ann"
    assert (audited["ro-scope"]["decision"], audited["ro-scope"]["reason"]) == ("would_deny", "insufficient_scope")
    assert (audited["ro-good"]["decision"], audited["ro-good"]["reason"]) == ("allow", "ok")
    assert 'sidecar_would_deny_total{reason="insufficient_scope",route="legacy"} 1.0' in metrics


def test_report_only_flag_and_check_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch):
    """`sidecar check` warns loudly for each report-only route; SIDECAR_REPORT_ONLY (set by --report-only) makes
    every route report-only."""
    from sidecar.config.loader import REPORT_ONLY_VARIABLE, load

    config = tmp_path / "sidecar.yaml"
    config.write_text((POLICIES / "gsan_client_token.yaml").read_text())
    assert main(["check", "--config", str(config)]) == 0
    assert "REPORT-ONLY" not in capsys.readouterr().err
    monkeypatch.setenv(REPORT_ONLY_VARIABLE, "1")
    assert {r.mode for r in load(str(config)).config.routes} == {"report_only"}
    assert main(["check", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "WARNING: route transactions is REPORT-ONLY" in err and "WARNING: route payments is REPORT-ONLY" in err
