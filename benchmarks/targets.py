"""Issue 20's targets beside what the latest `make bench` measured, as one Markdown table.

Each row: the target, the goal, the figure from the newest result file that measures it
(`scale.json`, `provisioning.json`, `fleet-<n>.json`, `noisy.json`, `pg_costs.json`), the
machine's 1-minute load average while it was measured (2 shared cores: a loaded machine
inflates latencies and slows everything), and whether the goal is met. A target no result
file measures says so instead of a number. `report.py` puts the table at the top of the
summary.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

Row = tuple[str, str, str, str, str]  # target, goal, measured, load, status


def _load(name: str) -> Any:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _load_of_rounds(rounds: list[dict[str, Any]]) -> str:
    loads = [float(r["loadavg"].split()[0]) for r in rounds if r.get("loadavg", "-") != "-"]
    return f"{statistics.median(loads):.1f}" if loads else "-"


def _status(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _missing(target: str, goal: str, why: str) -> Row:
    return (target, goal, f"not measured: {why}", "-", "-")


def scale_rows(report: dict[str, Any] | None, rls: dict[str, Any] | None = None) -> list[Row]:
    """From `scale.json` (schema isolation) and, for 100,000 tenants, `scale-rls.json`."""
    rows: list[Row] = []
    by_size = {r["tenants"]: r for r in report["results"]} if report else {}
    rls_by_size = {r["tenants"]: r for r in rls["results"]} if rls else {}
    for size, goal in ((10_000, 0.95), (100_000, 0.9)):
        target = f"tenancy/bare req/s, {size:,} tenants, uniform"
        run, note = (by_size, "schema") if size in by_size else (rls_by_size, "rls")
        if size not in run:
            rows.append(_missing(target, f"≥ {goal}", "`scale.py` ran no such size"))
            continue
        s = run[size]["summary"]
        load = _load_of_rounds(run[size]["rounds"])
        rows.append(
            (
                f"{target} ({note})",
                f"≥ {goal}",
                f"{s['ratio_median']:.3f}",
                load,
                _status(s["ratio_median"] >= goal),
            )
        )
    p99_runs = [(size, by_size[size], "") for size in sorted(by_size)]
    beyond = [size for size in sorted(rls_by_size) if size > max(by_size, default=0)]
    p99_runs += [(size, rls_by_size[size], " (rls)") for size in beyond]
    for size, result, label in p99_runs:
        ratio = result["summary"].get("paced_p99_ratio_median")
        if ratio is None:
            continue
        load = _load_of_rounds(result["rounds"])
        rows.append(
            (
                f"p99 at a fixed load vs bare, {size:,} tenants{label}",
                "≤ 1.10",
                f"{ratio:.2f}",
                load,
                _status(ratio <= 1.10),
            )
        )
    if rls_by_size and max(rls_by_size) > max(by_size, default=0) and len(rls_by_size) > 1:
        by_size = rls_by_size  # the RSS growth up to 100,000, from the run that got there
    if by_size:
        smallest, largest = min(by_size), max(by_size)
        growth = by_size[largest]["memory_mb"]["after"] - by_size[smallest]["memory_mb"]["after"]
        goal = "≤ 50 MB at 100,000 over 10"
        label = f"worker RSS growth, {largest:,} over {smallest:,} tenants"
        if largest >= 100_000:
            status = _status(growth <= 50)
        else:  # what the growth so far comes to at 100,000, if it stays linear
            status = f"not at 100,000 (linear: +{growth * 100_000 / largest:.0f} MB)"
        rows.append((label, goal, f"+{growth:.1f} MB", _load_of_rounds(by_size[largest]["rounds"]), status))
    else:
        rows.append(_missing("worker RSS growth", "≤ 50 MB at 100,000 over 10", "no `scale.json`"))
    return rows


def provisioning_rows(report: dict[str, Any] | None) -> list[Row]:
    if report is None:
        return [
            _missing("register a 30-table tenant from a spare, p50", "≤ 20 ms", "no `provisioning.json`"),
            _missing("template clone vs create_all, p50", "no slower", "no `provisioning.json`"),
        ]
    p50 = report["register_p50_ms"]
    load = f"{report['load'][0]:.1f}" if report.get("load") else "-"
    spare = p50["spare"]
    clone, create_all = p50["template"], p50["create_all"]
    return [
        (
            "register a 30-table tenant from a spare, p50",
            "≤ 20 ms",
            f"{spare:.0f} ms",
            load,
            _status(spare <= 20),
        ),
        (
            "template clone vs create_all, p50",
            "no slower",
            f"{clone:.0f} vs {create_all:.0f} ms",
            load,
            _status(clone <= create_all),
        ),
    ]


def fleet_rows() -> list[Row]:
    rows: list[Row] = []
    noop, alter = _load("fleet-noop-10000.json") or _load("fleet-10000.json"), _load("fleet-1000.json")
    target = "no-op upgrade of 10,000 schema tenants, CLI"
    if noop is None:
        rows.append(_missing(target, "≤ 5 s", "no `fleet-noop-10000.json`"))
    else:
        best = min(noop["noop_upgrade_s"])
        cpu = noop.get("noop_upgrade_cpu_s")
        measured = f"{best:.2f} s" + (f" (CPU {min(cpu):.2f} s)" if cpu else "")
        rows.append((target, "≤ 5 s", measured, f"{noop['machine']['load'][0]:.1f}", _status(best <= 5)))
    target = "one ALTER across 1,000 schema tenants"
    if alter is None or "alter_all" not in alter:
        rows.append(_missing(target, "≤ 10 s", "no `fleet-1000.json`"))
    else:
        wall = alter["alter_all"]["wall_s"]
        fixed = alter["concurrency"]
        used = alter["alter_all"].get("concurrency", fixed)
        label = f"{target} (concurrency {used}{'' if fixed else ', chosen by the runner'})"
        rows.append(
            (label, "≤ 10 s", f"{wall:.1f} s", f"{alter['machine']['load'][0]:.1f}", _status(wall <= 10))
        )
    return rows


def noisy_rows(report: dict[str, Any] | None) -> list[Row]:
    target = "quiet tenants' p99 with one hot tenant flooding / without"
    if report is None:
        return [_missing(target, "≤ 1.2", "no `noisy.json`")]
    capped, uncapped = report["summary"]["capped"], report["summary"]["uncapped"]
    cap = report["settings"]["cap"]
    measured = (
        f"{capped['p99_ratio_median']:.2f} with a cap of {cap} ({uncapped['p99_ratio_median']:.2f} without)"
    )
    return [
        (
            target,
            "≤ 1.2",
            measured,
            _load_of_rounds(report["rounds"]),
            _status(capped["p99_ratio_median"] <= 1.2),
        )
    ]


def pg_rows(report: dict[str, Any] | None) -> list[Row]:
    target = "PostgreSQL-side costs published (catalog, backend memory, pg_dump)"
    if report is None:
        return [_missing(target, "at 10,000 and 100,000", "no `pg_costs.json`")]
    sizes = [r["tenants"] for r in report["results"]]
    loads = ", ".join(r["loadavg"].split()[0] for r in report["results"])
    done = 10_000 in sizes and 100_000 in sizes
    status = "met" if done else ("partly: up to " + f"{max(sizes):,}")
    return [(target, "at 10,000 and 100,000", "at " + ", ".join(f"{s:,}" for s in sizes), loads, status)]


SECTIONS: list[Callable[[], list[Row]]] = [
    lambda: scale_rows(_load("scale.json"), _load("scale-rls.json")),
    lambda: provisioning_rows(_load("provisioning.json")),
    fleet_rows,
    lambda: noisy_rows(_load("noisy.json")),
    lambda: pg_rows(_load("pg_costs.json")),
]


def section() -> list[str]:
    """The targets table as Markdown lines (issue 20)."""
    lines = [
        "### Targets",
        "",
        "| target | goal | measured | load | status |",
        "|---|---|---|---:|---|",
    ]
    for make in SECTIONS:
        lines += [f"| {' | '.join(row)} |" for row in make()]
    lines += [
        "",
        "Load: the 1-minute load average while the figure was measured (median over its "
        "rounds), on 2 cores shared with other work. Where a target is missed, "
        "[where the time goes](#where-the-targets-stand) says why and what would close it.",
    ]
    return lines
