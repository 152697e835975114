"""tools/bench.py (make bench) end to end, every system, on a tiny grid (its numbers are not asserted: benchmarks are not tests)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from serveready.archiver import ModelSpec
from tests.conftest import ROOT
from tests.e2e.test_tune import _need_wrk
from tools.bench import SYSTEMS, workloads


def test_bench_serves_every_system_and_writes_the_page(net_spec: ModelSpec, net_archive: Path, tmp_path: Path) -> None:
    _need_wrk()
    work = tmp_path / "project"  # what `make bench` runs in: the net example's model and weights, model_store/
    for folder in ("examples/net/models", "examples/net/artifacts", "model_store"):
        (work / folder).mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "net" / "models" / "net.py", work / "examples" / "net" / "models")
    shutil.copy(net_spec.weights, work / "examples" / "net" / "artifacts" / "net.pt")
    shutil.copy(net_archive, work / "model_store" / "net.mar")
    out = tmp_path / "page" / "bench.md"
    out.parent.mkdir()
    command = [sys.executable, "-m", "tools.bench", "--models", "net", "--levels", "1,4", "--seconds", "1", "--repeats", "1",
               "--lone-repeats", "2", "--warmup", "1", "--image", str(ROOT / "docs" / "images" / "digit.png"), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the repository's tools/, run from another folder
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]

    recorded = json.loads(out.with_suffix(".json").read_text())
    cells = {(c["system"], c["concurrency"]): c for c in recorded["cells"]["net"]}
    assert set(cells) == {(s, level) for s in SYSTEMS for level in (1, 4)}
    repeats = sorted((c["concurrency"], c["repeat"]) for c in recorded["cells"]["net"] if c["system"] == "project")
    assert repeats == [(1, 0), (1, 1), (4, 0)]  # the lone client's cells twice (--lone-repeats), the others once
    for key, cell in cells.items():  # every system answered, and answered right (wrk counts non-2xx as errors)
        assert cell["requests"] > 0 and cell["errors"] == 0, key
    page = out.read_text()
    assert "Targets, `project` (net):" in page and "| stock-tuned | 4 |" in page and out.with_suffix(".png").is_file()


def test_bench_runs_the_text_and_audio_workloads_against_their_stock_handlers(sentiment_spec: ModelSpec, sentiment_archive: Path,
                                                                               spoken_digits_spec: ModelSpec, spoken_digits_archive: Path,
                                                                               tmp_path: Path) -> None:
    """The review and the WAV of the README's curl lines, on the archive, a plain TorchServe, the stock handlers and
    LitServe: every system answers the same class (the bench checks that before it measures), and without errors."""
    _need_wrk()
    work = tmp_path / "project"
    specs = {"sentiment": (sentiment_spec, sentiment_archive), "spoken_digits": (spoken_digits_spec, spoken_digits_archive)}
    for name, load in workloads(ROOT / "docs" / "images" / "digit.png").items():
        if name not in specs:
            continue
        spec, archive = specs[name]
        sources = {load.model_file: spec.model_file, load.weights: spec.weights}
        sources.update({want: next(f for f in spec.extra_files if f.name == want.name) for want in load.extra_files})
        for target, source in [*sources.items(), (Path("model_store") / f"{name}.mar", archive)]:
            (work / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, work / target)
    out = tmp_path / "page" / "bench.md"
    out.parent.mkdir()
    command = [sys.executable, "-m", "tools.bench", "--models", "sentiment,spoken_digits", "--systems", "project,plain,stock-b1,litserve",
               "--levels", "2", "--seconds", "1", "--repeats", "1", "--lone-repeats", "1", "--warmup", "1", "--image", str(ROOT / "docs" / "images" / "digit.png"),
               "--review", str(ROOT / "docs" / "review.txt"), "--clip", str(ROOT / "docs" / "seven.wav"), "--out", str(out)]
    done = subprocess.run(command, cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]

    recorded = json.loads(out.with_suffix(".json").read_text())
    assert recorded["answers"] == {"sentiment": "class positive", "spoken_digits": "class 7"}
    for model in ("sentiment", "spoken_digits"):
        cells = {(c["system"], c["concurrency"]): c for c in recorded["cells"][model]}
        assert set(cells) == {(s, 2) for s in ("project", "plain", "stock-b1", "litserve")}
        assert all(c["requests"] > 0 and c["errors"] == 0 for c in cells.values()), cells
    assert "Every system answers the body with the same class 7" in out.read_text()
