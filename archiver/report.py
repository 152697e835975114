"""The fidelity report: ``model_store/report.json`` and a Markdown table for the docs."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

#: Row order within a base model: the fp32 reference first, then cheaper variants.
_ORDER = ["fp32", "int8_dynamic", "int8_static", "float16", "bfloat16", "pruned", "pruned_structured", "distilled", "onnx", "exported"]


def machine() -> str:
    """Where the latencies were measured."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, torch {torch.__version__}"


def write_report(rows: list[dict[str, Any]], json_path: Path, md_path: Path | None) -> None:
    """Merge ``rows`` into the JSON report (by archive name) and rewrite the Markdown table."""
    existing = {}
    if json_path.is_file():
        try:
            existing = {row["name"]: row for row in json.loads(json_path.read_text()).get("archives", [])}
        except (ValueError, KeyError, TypeError, AttributeError):
            existing = {}
    existing.update({row["name"]: row for row in rows})
    ordered = sorted(existing.values(), key=lambda r: (r["base"], _ORDER.index(r["kind"]) if r["kind"] in _ORDER else 99, r["name"]))
    report = {"measured_on": machine(), "date": datetime.date.today().isoformat(), "archives": ordered}
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    if md_path is not None:
        md_path.write_text(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Model variants: size, quality, fidelity, latency",
        "",
        "Written by `make mar` (`ts-archive build`) from `model_store/report.json`; do not edit by hand.",
        "How each variant is made, and why, is in [variants-howto.md](variants-howto.md).",
        f"Measured on {report['measured_on']}, {report['date']}. Latency: in-process median",
        "of 30 forwards after 5 warm-ups, one torch thread (as one worker runs it); repeats",
        "on this machine differ by up to 30%, so compare rows of one run: `make mar` re-measures only",
        "the archives it rebuilds, `make report` re-measures all of them.",
        "Quality: held-out MSE against the ground truth (`net`), top-1 accuracy (`digits`).",
        "|Δ|: absolute difference from the fp32 model's served numbers on the held-out set",
        "(predictions for `net`, class probabilities for `digits`).",
        "",
        "| archive | kind | .mar KiB | params | non-zero | quality | max abs diff | mean abs diff | 1 row ms | 64 rows ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["archives"]:
        quality = f"acc {r['accuracy']:.4f}" if "accuracy" in r else f"MSE {r['mse']:.5f}"
        lines.append(
            f"| {r['name']} | {r['kind']} | {r['archive_bytes'] / 1024:.1f} | {r['parameters']:,} | {r['nonzero_parameters']:,} "
            f"| {quality} | {r['max_abs_diff']:.2e} | {r['mean_abs_diff']:.2e} | {r['latency_ms_1_row']:.3f} | {r['latency_ms_64_rows']:.3f} |"
        )
    return "\n".join(lines) + "\n"
