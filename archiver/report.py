"""The build report: ``report.json`` beside the archives, and a Markdown table of it."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from serveready.handlers.runtime import machine

from .variants import KINDS

_ORDER = list(KINDS)


def write_report(rows: list[dict[str, Any]], json_path: Path, md_path: Path | None) -> None:
    """Merge ``rows`` into the JSON report (by archive name) and rewrite the Markdown table."""
    existing = {}
    if json_path.is_file():
        try:
            existing = {row["name"]: row for row in json.loads(json_path.read_text()).get("archives", [])}
        except (ValueError, KeyError, TypeError, AttributeError):
            existing = {}
    existing.update({row["name"]: row for row in rows})
    ordered = sorted(existing.values(), key=lambda r: (r["base"], _ORDER.index(r["variant"]) if r.get("variant") in _ORDER else 99, r["name"]))
    report = {"measured_on": machine(), "date": datetime.date.today().isoformat(), "archives": ordered}
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: one row per archive, fp32 first within each model."""
    lines = [
        "# Archives: size, quality, fidelity, latency",
        "",
        "Written by `ts-archive build` from `report.json` beside the archives; do not edit by hand.",
        f"Measured on {report['measured_on']}, {report['date']}. Latency: in-process median",
        "of 30 forwards after 5 warm-ups, with the worker's torch threads (1 unless the config says);",
        "repeats on one machine differ by up to 30%, so compare rows of one run: `ts-archive build --if-stale`",
        "re-measures only the archives it rebuilds, `ts-archive build` all of them.",
        "Quality: top-1 accuracy (classifiers) or MSE (regression) on the held-out data;",
        "|Δ|: absolute difference from the fp32 model's served numbers (class probabilities or predictions).",
        "Models without held-out data (no training recipe, no `data:` file) show –.",
        "",
        "| archive | kind | .mar KiB | params | non-zero | quality | max abs diff | mean abs diff | 1 row ms | 64 rows ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["archives"]:
        quality = f"acc {r['accuracy']:.4f}" if "accuracy" in r else f"MSE {r['mse']:.5f}" if "mse" in r else "–"
        diffs = [f"{r[k]:.2e}" if k in r else "–" for k in ("max_abs_diff", "mean_abs_diff")]
        lines.append(
            f"| {r['name']} | {r['kind']} | {r['archive_bytes'] / 1024:.1f} | {r['parameters']:,} | {r['nonzero_parameters']:,} "
            f"| {quality} | {diffs[0]} | {diffs[1]} | {r['latency_ms_1_row']:.3f} | {r['latency_ms_64_rows']:.3f} |"
        )
    return "\n".join(lines) + "\n"
