"""Results: ratios to the baselines, the printed table and the JSON file."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class CaseResult:
    label: str
    case: str
    description: str
    transport: str | None = None
    url: str = ""
    rps: float | None = None
    requests: int | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    wrk_errors: dict[str, int] = field(default_factory=dict)
    cpu_us_per_req: float | None = None
    cpu_scope: str = ""
    foreign_cpu_cores: float | None = None  # CPU used by programs the bench did not start, during the run
    light: dict[str, Any] | None = None
    vs_upstream: dict[str, float] = field(default_factory=dict)
    vs_nginx_proxy: dict[str, float] = field(default_factory=dict)
    light_added_ms: dict[str, float] = field(default_factory=dict)
    memory: dict[str, Any] | None = None  # idle_conns and rss_soak (bench/memory.py)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def add_ratios(results: list[CaseResult]) -> None:
    """Fill vs_upstream / vs_nginx_proxy (rps, p50, p99 as multiples) and the light-load added latency."""
    base = {r.case: r for r in results if r.case in ("upstream", "nginx_proxy") and r.error is None}
    for r in results:
        if r.error is not None:
            continue
        for name, attr in (("upstream", "vs_upstream"), ("nginx_proxy", "vs_nginx_proxy")):
            b = base.get(name)
            if b is None:
                continue
            ratios = {
                "rps": _ratio(r.rps, b.rps),
                "p50": _ratio(r.latency_ms.get("p50"), b.latency_ms.get("p50")),
                "p99": _ratio(r.latency_ms.get("p99"), b.latency_ms.get("p99")),
            }
            setattr(r, attr, {k: v for k, v in ratios.items() if v is not None})
        up = base.get("upstream")
        if r.light and up is not None and up.light:
            r.light_added_ms = {
                q: r.light["latency_ms"][q] - up.light["latency_ms"][q]
                for q in ("p50", "p99")
                if q in r.light["latency_ms"] and q in up.light["latency_ms"]
            }


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


HEADERS = [
    "case",
    "rps",
    "p50 ms",
    "p99 ms",
    "× upstream",  # noqa: RUF001
    "× nginx_proxy",  # noqa: RUF001
    "CPU µs/req",
    "light p50/p99 ms",
    "added p50/p99 ms",
]


def memory_cell(m: dict[str, Any] | None) -> str:
    """The memory column: MB added and KiB per connection (idle_conns), or RSS start/end/max and drift (rss_soak)."""
    if not m:
        return "-"
    if "kib_per_conn" in m:
        return f"+{m['added_mb']:.1f} MB, {m['kib_per_conn']:.1f} KiB/conn"
    return (
        f"{m['rss_start_mb']:.0f}/{m['rss_end_mb']:.0f}/{m['rss_max_mb']:.0f} MB start/end/max, "
        f"drift {m['drift_pct']:+.1f} %"
    )


def table(results: list[CaseResult]) -> str:
    rows: list[list[str]] = []
    with_memory = any(r.memory for r in results)
    headers = HEADERS + (["memory"] if with_memory else [])
    for r in results:
        if r.error is not None:
            rows.append([r.label, "FAILED"] + [""] * (len(headers) - 2))
            continue
        light = added = "-"
        if r.light:
            lm = r.light["latency_ms"]
            light = f"{_f(lm.get('p50'), '.3f')}/{_f(lm.get('p99'), '.3f')}"
        if r.light_added_ms:
            added = f"{_f(r.light_added_ms.get('p50'), '+.3f')}/{_f(r.light_added_ms.get('p99'), '+.3f')}"
        rows.append(
            [
                r.label,
                _f(r.rps, ",.0f"),
                _f(r.latency_ms.get("p50"), ".3f"),
                _f(r.latency_ms.get("p99"), ".3f"),
                _f(r.vs_upstream.get("rps"), ".3f"),
                _f(r.vs_nginx_proxy.get("rps"), ".3f"),
                _f(r.cpu_us_per_req, ".1f"),
                light,
                added,
                *([memory_cell(r.memory)] if with_memory else []),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows]
    notes = []
    for r in results:
        for w in r.warnings:
            notes.append(f"  note [{r.label}]: {w}")
        if r.error is not None:
            first = r.error.strip().splitlines()
            notes.append(f"  FAILED [{r.label}]: {first[0] if first else ''}")
    if notes:
        out += ["", *notes]
    return "\n".join(out)


def write_json(path: Path, meta: dict[str, Any], results: list[CaseResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = _clean({"meta": meta, "cases": [asdict(r) for r in results]})
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False, default=str) + "\n")
    tmp.replace(path)


def _clean(obj: Any) -> Any:
    """NaN/inf (e.g. percentiles of an empty sample) become null so the file stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj
