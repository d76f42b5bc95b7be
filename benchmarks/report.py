"""Gather the latest benchmark results into one summary, with plots, and embed it in the docs.

Reads `results/overhead.json`, `scale.json`, `lookups-*.json`, `provisioning.json`, `fleet-*.json`,
`noisy.json`, `pg_costs.json` (each
written by its script; missing ones are left out), writes `results/summary.md` and the
plots `docs/images/bench-*.png` (matplotlib), and replaces the part of
`docs/performance.md` between `<!-- bench:start -->` and `<!-- bench:end -->` with the
summary. `make bench` runs every script, then this one.

    .venv/bin/python benchmarks/report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "docs" / "images"
PAGE = ROOT / "docs" / "performance.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _load(name: str) -> Any:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def overhead_section(report: dict[str, Any]) -> list[str]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import overhead
    import scale

    lines = [
        f"### Request overhead ({report['date']})",
        "",
        "| backend/strategy | tenancy req/s | bare req/s | req/s ratio (min-max) "
        "| p99 ms at saturation (ratio) | fixed load: p50, p99 ms | **p99 ratio at fixed load** |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in report["results"]:  # one row per backend and isolation strategy
        s = res["summary"]
        t, b = s["tenancy"], s["bare"]
        saturated = s.get("p99_ratio_median", t["p99_ms_median"] / b["p99_ms_median"])
        lines.append(
            f"| {overhead.label(res)} | {t['rps_median']:.0f} | {b['rps_median']:.0f} "
            f"| **{s['ratio_median']:.3f}** ({s['ratio_min']:.3f}-{s['ratio_max']:.3f}) "
            f"| {t['p99_ms_median']:.1f} / {b['p99_ms_median']:.1f} ({saturated:.2f}) "
            f"| {scale.paced_cells(s)} |"
        )
    lines += [
        "",
        "Latencies: tenancy / bare. Saturation: as many requests as the server takes "
        f"({report['settings']['connections']} connections), where latency is mostly queueing. Fixed "
        "load: paced runs well below saturation, where a request's latency is its own; ratios per "
        "round, then the median. What each bare side reads, and why it is the fair no-tenancy "
        "equivalent: `benchmarks/overhead.py`'s docstring.",
    ]
    return lines


def scale_section(report: dict[str, Any]) -> list[str]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scale

    return [f"### Tenant count ({report['date']})", "", scale.table(report["results"])]


def small_sections() -> list[str]:
    lines: list[str] = []
    lookups = [_load(f"lookups-{b}.json") for b in ("postgres", "sqlite")]
    if any(lookups):
        lines += [
            "### Tenant lookup, in process",
            "",
            "| registry | tenants | cache hit µs | unknown (negative cache) µs | cache miss µs |",
            "|---|---:|---:|---:|---:|",
        ]
        for item in filter(None, lookups):
            us = item["us_per_resolve"]
            lines.append(
                f"| {item['backend']} | {item['tenants']:,} | {us['hit']:.1f} | {us['unknown']:.1f} "
                f"| {us['miss']:.0f} |"
            )
        lines.append("")
    provisioning = _load("provisioning.json")
    if provisioning:
        p95 = provisioning.get("register_p95_ms", {})
        lines += [
            f"### Provisioning: registering a tenant with {provisioning['tables']} tables (PostgreSQL)",
            "",
            "| way | p50 ms | p95 ms |",
            "|---|---:|---:|",
        ]
        for way, ms in provisioning["register_p50_ms"].items():
            worst = f"{p95[way]:.0f}" if way in p95 else "-"
            lines.append(f"| {way} | {ms:.0f} | {worst} |")
        lines.append("")
    # fleet-<tenants>.json from fleet.py (schemas); fleet-databases.json is reported below.
    fleets = sorted(
        (
            p
            for p in RESULTS.glob("fleet-*.json")
            if p.stem.removeprefix("fleet-").removeprefix("noop-").isdigit()
        ),
        key=lambda p: json.loads(p.read_text())["tenants"],
    )
    if fleets:
        lines += [
            "### Fleet migrations (through the CLI)",
            "",
            "| tenants | no-op upgrade s (CLI) | the CLI's CPU s | no-op in process s "
            "| one ALTER, all tenants s | per tenant p50 / p95 ms | load at start |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        runs = [json.loads(path.read_text()) for path in fleets]
        for run in runs:
            alter = run.get("alter_all")  # absent: a --noop-only run
            cpu = f"{min(run['noop_upgrade_cpu_s']):.2f}" if run.get("noop_upgrade_cpu_s") else "-"
            alter_cells = (
                f"{alter['wall_s']:.1f} | {alter['p50_ms']:.0f} / {alter['p95_ms']:.0f}" if alter else "- | -"
            )
            lines.append(
                f"| {run['tenants']:,} | {min(run['noop_upgrade_s']):.2f} | {cpu} "
                f"| {min(run['noop_upgrade_in_process_s']):.3f} | {alter_cells} "
                f"| {run['machine']['load'][0]:.1f} |"
            )
        concurrency = " / ".join(sorted({str(run["concurrency"]) for run in runs if "alter_all" in run}))
        lines += [
            "",
            f"One run per row, concurrency {concurrency}, best of 3 for the no-op upgrade (rows without "
            "an ALTER: `--noop-only` runs). Wall times at a high load are mostly waiting for a core; "
            "the CLI's CPU time is not. Load is "
            "the 1-minute load average on 2 shared cores when the run started: rows taken at "
            "different loads do not compare directly. Kill-and-resume and the discussion: "
            "`benchmarks/results/fleet.md`.",
            "",
        ]
    for name in ("noisy", "pg_costs"):
        # Their own Markdown, without its title line and its generator line.
        path = RESULTS / f"{name}.md"
        if path.exists():
            body = path.read_text().split("\n", 1)[1].strip()
            lines += [f"### {path.read_text().splitlines()[0].removeprefix('# ')}", "", body, ""]
    databases = _load("fleet-databases.json")
    if databases:
        lines += [
            f"Database per tenant ({databases['tenants']} tenant databases, concurrency "
            f"{databases['concurrency']}): no-op upgrade {databases['noop_upgrade_s']:.1f} s, "
            f"one ALTER across all {databases['alter_table_s']:.1f} s.",
            "",
        ]
    return lines


def plots(scale_report: dict[str, Any] | None) -> list[str]:
    if scale_report is None:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install -e '.[bench]')", file=sys.stderr)
        return []
    results = scale_report["results"]
    sizes = [r["tenants"] for r in results]
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(sizes, [r["summary"]["ratio_median"] for r in results], "o-", label="req/s ratio")
    left.plot(sizes, [r["summary"]["p99_ratio_median"] for r in results], "s--", label="p99 ratio")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_xscale("log")
    left.set_xlabel("registered tenants")
    left.set_title("tenancy / bare")
    left.legend()
    right.plot(sizes, [r["memory_mb"]["after"] for r in results], "o-")
    right.set_xscale("log")
    right.set_xlabel("registered tenants")
    right.set_ylabel("MB")
    right.set_title("worker RSS after load")
    fig.tight_layout()
    fig.savefig(IMAGES / "bench-scale.png", dpi=100)
    plt.close(fig)
    return ["", "![tenancy/bare ratios and worker memory by tenant count](images/bench-scale.png)"]


def main() -> int:
    overhead_report, scale_report = _load("overhead.json"), _load("scale.json")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import targets

    lines: list[str] = [*targets.section(), ""]
    if overhead_report:
        lines += overhead_section(overhead_report) + [""]
    if scale_report:
        lines += scale_section(scale_report) + plots(scale_report) + [""]
    lines += small_sections()
    summary = "\n".join(lines).strip() + "\n"
    (RESULTS / "summary.md").write_text(
        "# Benchmark summary\n\n" + summary.replace("images/", "../../docs/images/")
    )
    page = PAGE.read_text()
    head, _, rest = page.partition(START)
    _, _, tail = rest.partition(END)
    PAGE.write_text(f"{head}{START}\n{summary}{END}{tail}")
    print(f"wrote {RESULTS / 'summary.md'} and the summary in {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
