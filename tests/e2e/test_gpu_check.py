"""ts-gpu-check end to end, on CPU workers (the GPU run is the same code with --device gpu)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, VariantBuild


def test_gpu_check_runs_every_archive_and_reports(net_archive: Path, variant_builds: dict[str, VariantBuild], tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    for archive in [net_archive] + [variant_builds[n].archive for n in ("net_int8", "digits_fp16", "sentiment_int8", "spoken_digits_int8")]:
        shutil.copy(archive, store)
    out = tmp_path / "report" / "check"
    command = [str(Path(sys.executable).with_name("ts-gpu-check")), "--device", "cpu", "--model-store", str(store), "--out", str(out),
               "--data", str(variant_builds["digits_fp16"].spec.data.path), "--data", str(variant_builds["sentiment_int8"].spec.data.path),
               "--clients", "4", "--requests", "5", "--logs", str(tmp_path / "logs")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    checks = {c["name"]: c for c in report["archives"]}
    assert {name: c["outcome"] for name, c in checks.items()} == {"net": "served", "net_int8": "served", "digits_fp16": "served", "sentiment_int8": "served",
                                                                   "spoken_digits_int8": "served"}  # clips made by the handler (sample_instance)
    assert checks["net"]["measure"]["max_abs_diff_vs_cpu"] <= 1e-5 and checks["net"]["detail"].startswith("64 inputs")
    assert checks["net_int8"]["runs_with"].startswith("torch int8 dynamic on cpu")
    # digits inputs are the data file's held-out digits (sent as ink counts by the example's handler), not random ones
    assert checks["digits_fp16"]["runs_with"].startswith("torch float16 on cpu") and checks["digits_fp16"]["measure"]["top_class_agreement"] >= 0.98
    # texts: the held-out reviews' token ids decoded by the archive's tokenizer, sent as v2 BYTES
    assert checks["sentiment_int8"]["measure"]["top_class_agreement"] == 1.0 and checks["sentiment_int8"]["measure"]["max_abs_diff_vs_cpu"] <= 1e-5
    assert [(ld["name"], ld["requests"], ld["statuses"], ld["wrong"]) for ld in report["loads"]] == [
        (name, 20, {"200": 20}, 0) for name in ("digits_fp16", "net", "net_int8", "sentiment_int8", "spoken_digits_int8")]
    assert {t["archive"] for t in report["in_process"]} == {"digits_fp16", "net", "net_int8", "sentiment_int8", "spoken_digits_int8"}
    assert "| net_int8 | int8_dynamic | **served** |" in out.with_suffix(".md").read_text()
    # --logs keeps what the workers said after the scratch server is gone
    assert "model net_int8 runs with torch int8 dynamic on cpu" in (tmp_path / "logs" / "model_log.log").read_text()


def test_gpu_check_without_a_gpu_says_what_to_do(tmp_path: Path) -> None:
    done = subprocess.run([str(Path(sys.executable).with_name("ts-gpu-check")), "--model-store", str(ROOT / "model_store")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "no GPU here (none visible): run it on a machine with one, or --device cpu" in done.stderr or "make mar" in done.stderr
