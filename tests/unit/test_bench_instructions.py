"""bench/instructions.py without valgrind: reading a callgrind dump's `summary:`/`totals:`, choosing the sidecar's
dump among the traced processes', the tracing-overhead arithmetic, the plan and the do-nothing OTLP receiver."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from bench import instructions as ins
from bench.sidecar_proc import Sidecar

PYTHON = "/root/.pyenv/versions/3.11.7/bin/python"


def _dump_text(pid: int, cmd: str, summary: str, totals: str | None, events: str = "Ir", part: int = 1) -> str:
    closing = f"\ntotals: {totals}\n" if totals is not None else ""
    return (
        f"# callgrind format\nversion: 1\ncreator: callgrind-3.19.0\npid: {pid}\ncmd:  {cmd}\npart: {part}\n\n\n"
        "desc: I1 cache: \ndesc: Timerange: Basic block 0 - 1011192247\ndesc: Trigger: dump\n\n"
        f"positions: line\nevents: {events}\nsummary: {summary}\n\n\nob=(1) /usr/lib/libc.so.6\nfl=(1) ???\n"
        f"fn=(1) memcpy\n0 1200\ncalls=2 0\n0 88000\n{closing}"
    )


def test_parse_dump_reads_header_and_closing_totals() -> None:
    d = ins.parse_dump(_dump_text(23274, f"{PYTHON} -m sidecar run --workers 1", "929255069", "956430336"),
                       Path("callgrind.out.23274.1"))
    assert (d.pid, d.part, d.events) == (23274, 1, ["Ir"])
    assert d.cmd == f"{PYTHON} -m sidecar run --workers 1"
    assert (d.summary, d.totals) == (929_255_069, 956_430_336)
    assert d.instructions == 929_255_069  # the header's summary: the counters' difference since the zero


def test_parse_dump_picks_the_event_column_and_falls_back_to_totals() -> None:
    d = ins.parse_dump(_dump_text(7, PYTHON, "10 20 30", "11 21 31", events="Ir Dr Dw"), Path("x"))
    assert (d.summary, d.totals) == (10, 11)
    assert ins.parse_dump(_dump_text(7, PYTHON, "10 20", None, events="Ir Dr"), Path("x"), event="Dr").summary == 20
    assert ins.parse_dump(_dump_text(7, PYTHON, "10", None, events="Ir Dr"), Path("x"), event="Dr").summary == 0
    no_summary = _dump_text(7, PYTHON, "1", "5").replace("summary: 1\n", "")
    assert ins.parse_dump(no_summary, Path("x")).instructions == 5
    with pytest.raises(ins.DumpError, match="incomplete"):
        _ = ins.parse_dump("# callgrind format\npid: 7\n", Path("x")).instructions


def test_dump_parts_are_the_first_dump_of_each_process(tmp_path: Path) -> None:
    for name in ("callgrind.out.12", "callgrind.out.12.1", "callgrind.out.13.1", "callgrind.out.13.10",
                 "callgrind.out.14.2", "other.1"):
        (tmp_path / name).write_text("")
    assert [p.name for p in ins.dump_parts(tmp_path)] == ["callgrind.out.12.1", "callgrind.out.13.1"]
    assert [p.name for p in ins.dump_parts(tmp_path, part=2)] == ["callgrind.out.14.2"]


@pytest.mark.parametrize(("cmd", "python"), [
    (f"{PYTHON} -m sidecar run --config /tmp/x/sidecar.yaml", True),
    ("/usr/bin/python3.11 -m sidecar run", True),
    ("python3 -m sidecar", True),
    ("/bin/bash /root/.pyenv/libexec/pyenv-version-name", False),
    ("/usr/bin/env PYTHONPATH=/old python -m sidecar run", False),
    ("/usr/bin/pythonista", False),
    ("", False),
])
def test_runs_python(cmd: str, python: bool) -> None:
    assert ins.runs_python(cmd) is python


def test_pick_dump_prefers_the_python_process() -> None:
    def dump(pid: int, cmd: str) -> ins.Dump:
        return ins.Dump(Path(f"callgrind.out.{pid}.1"), pid=pid, cmd=cmd, part=1, summary=pid)

    shim = dump(11, "/bin/bash /root/.pyenv/libexec/pyenv-exec python")
    sidecar = dump(12, f"{PYTHON} -m sidecar run --workers 1")
    assert ins.pick_dump([sidecar]) is sidecar
    assert ins.pick_dump([shim]) is shim  # the only process dumped: whatever its command line
    assert ins.pick_dump([shim, sidecar]) is sidecar
    with pytest.raises(ins.DumpError, match="2 running python"):
        ins.pick_dump([sidecar, dump(13, f"{PYTHON} -c pass")])
    with pytest.raises(ins.DumpError, match="no dump part"):
        ins.pick_dump([])


def test_overhead_arithmetic() -> None:
    # the ad-hoc figures: 400 k off, 403.6 k at ratio 0, 1,340 k at ratio 1.0 -> 0.9 % + 0.01 x 235 % = 3.25 %
    assert ins.overhead_pct(400_000, 403_600, 1_340_000) == pytest.approx(3.25)
    assert ins.overhead_pct(400_000, 403_600, 1_340_000, ratio=0.0) == pytest.approx(0.9)
    assert ins.overhead_pct(100, 100, 100) == 0.0
    with pytest.raises(ValueError):
        ins.overhead_pct(0, 1, 2)

    def run(command: str, ratio: float | None, per: float | None) -> ins.Run:
        return ins.Run("jwt_cached", command, [], ratio, 1000, per_request=per)

    runs = [run("sidecar", None, 400_000), run("baseline", None, 500_000), run("sidecar", 0.0, 403_600),
            run("baseline", 0.0, 505_000), run("sidecar", 1.0, 1_340_000), run("baseline", 1.0, None)]
    assert ins.estimates(runs) == {"jwt_cached": {"sidecar": 3.25}}  # the baseline's ratio-1 run failed
    text = ins.table(runs)
    assert "sidecar +3.25 %" in text  # the estimate line
    lines = text.splitlines()
    assert lines[2].split() == ["jwt_cached", "off", "400,000", "1.000", "500,000", "0.800"]
    assert lines[4].split()[3:] == ["1,340,000", "3.350", "FAILED", "-"]


def test_flags_plan_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = ins.parse_args(["--case", "jwt_cached,anonymous", "--tracing-ratio", "0,1.0",
                           "--baseline-cmd", "env PYTHONPATH='/old tree' python -m sidecar"])
    assert args.ratios == [0.0, 1.0]
    assert args.baseline_cmd == ["env", "PYTHONPATH=/old tree", "python", "-m", "sidecar"]
    todo = ins.plan(args)
    assert [(c.name, label, ratio) for c, label, _, ratio in todo[:4]] == [
        ("jwt_cached", "sidecar", None), ("jwt_cached", "baseline", None),
        ("jwt_cached", "sidecar", 0.0), ("jwt_cached", "baseline", 0.0)]
    assert len(todo) == 12
    assert ins.time_limit(args, len(todo)) > 12 * 300
    with pytest.raises(ValueError):
        ins.parse_ratios("0,1.5")
    with pytest.raises(SystemExit):
        ins.parse_args(["--case", "jwt_new_https"])

    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    off = ins.tracing_env(None, None)
    assert off["OTEL_SDK_DISABLED"] is None and "OTEL_EXPORTER_OTLP_ENDPOINT" not in off
    on = ins.tracing_env(0.0, 4318)
    assert on["OTEL_SDK_DISABLED"] is None
    assert on["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4318"
    assert (on["OTEL_TRACES_SAMPLER_ARG"], on["OTEL_BSP_SCHEDULE_DELAY"]) == ("0.0", "1000")


def test_sidecar_prefix_and_environment(tmp_path: Path) -> None:
    sc = Sidecar(tmp_path, "version: 1\n", workers=1, transport=None, command=["sidecar"],
                 prefix=["valgrind", "--tool=callgrind"], env={"A": "1", "B": None})
    assert sc.argv()[:4] == ["valgrind", "--tool=callgrind", "sidecar", "run"]
    assert sc.env == {"A": "1", "B": None}


def test_otlp_sink_answers_and_counts() -> None:
    sink = ins.OtlpSink()
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{sink.port}/v1/traces", data=b"\x0a\x00", method="POST",
                                     headers={"Content-Type": "application/x-protobuf"})
        for _ in range(2):
            with urllib.request.urlopen(req, timeout=5) as r:
                assert (r.status, r.read()) == (200, b"")
        assert (sink.exports, sink.bytes) == (2, 4)
    finally:
        sink.close()


def test_missing_valgrind_fails_with_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import tools

    monkeypatch.setattr(tools, "_which", lambda tool: None)
    monkeypatch.setattr(tools.os, "geteuid", lambda: 1000)  # not root: no apt-get, a message
    for tool in ("valgrind", "callgrind_control"):
        with pytest.raises(tools.ToolMissing, match="apt-get install -y valgrind"):
            tools.ensure(tool)
