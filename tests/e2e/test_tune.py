"""The tuner and the load generator against a real TorchServe (no timings asserted: benchmarks are not tests)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from serveready.archiver.tune import Candidate, SweepPlan
from serveready.scripts.archive import main as archive_main
from serveready.scripts.tune import sweep
from tests.conftest import EXAMPLES


def _need_wrk() -> None:
    if shutil.which("wrk") is None:
        if os.environ.get("CI"):
            pytest.fail("wrk is not installed: .ci/run installs it")
        pytest.skip("wrk is not installed (apt-get install wrk)")


def test_sweep_measures_every_candidate_at_every_level(net_archive: Path) -> None:
    _need_wrk()
    grid = [Candidate(1, 1, 0, 1), Candidate(1, 8, 1, 1)]
    lines: list[str] = []
    found = sweep(net_archive, b'{"inputs": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]}', "application/json", grid,
                  SweepPlan(levels=(1, 4), seconds=1, screen_seconds=1, keep=2, repeats=2, warmup_seconds=1), lines.append)
    assert sorted(m.candidate for m in found) == grid
    for m in found:
        assert [p.concurrency for p in m.points] == [1, 4]
        assert m.errors == 0 and all(p.rps > 0 and 0 < p.p50_ms <= p.p99_ms for p in m.points)
    assert [line.split(":")[0] for line in lines[:2]] == ["[screen 1/2] w1 b1 d0 t1", "[screen 2/2] w1 b8 d1 t1"]
    assert [line.split(" ")[0] + " " + line.split(" ")[1] for line in lines[2:]] == [f"[measure {i}/8]" for i in range(1, 9)]  # 2 repeats x 2 levels x 2


def test_sweep_counts_refused_requests_as_errors(net_archive: Path) -> None:
    _need_wrk()
    [m] = sweep(net_archive, b'{"inputs": [1]}', "application/json", [Candidate(1, 1, 0, 1)],
                SweepPlan(levels=(2,), seconds=1, screen_seconds=1, keep=1, repeats=1, warmup_seconds=0), lambda line: None)
    assert m.errors > 0  # every answer was a 400: wrong row width


def test_tune_command_measures_and_writes_the_pick(net_archive: Path, tmp_path: Path) -> None:
    """`ts-archive tune` end to end on a tiny grid: measured on a real TorchServe, reported, written into serve:."""
    _need_wrk()
    folder = shutil.copytree(EXAMPLES / "net", tmp_path / "net", ignore=shutil.ignore_patterns("artifacts", "data", "__pycache__", "net_*.yaml"))
    configs, store, out = folder / "model_configs", tmp_path / "model_store", tmp_path / "tuning"
    store.mkdir()
    shutil.copy(net_archive, store / "net.mar")
    code = archive_main(["--configs", str(configs), "tune", "net", "--store", str(store), "--concurrency", "1,2", "--workers", "1",
                         "--batch-sizes", "1,2", "--delays", "0", "--threads", "1", "--seconds", "1", "--screen-seconds", "1", "--keep", "2",
                         "--repeats", "1", "--warmup", "0", "--lone-slowdown", "0", "--p99-ms", "10000", "--out", str(out)])
    assert code == 0
    chosen = json.loads((out / "net.json").read_text())["chosen"]
    assert chosen in [{"workers": 1, "batch_size": b, "max_batch_delay": 0, "threads": 1} for b in (1, 2)]
    written = yaml.safe_load((configs / "net.yaml").read_text())
    assert (written["serve"]["minWorkers"], written["serve"]["batchSize"], written["serve"]["maxBatchDelay"]) == (1, chosen["batch_size"], 0)
    assert "# tuned:" in (configs / "net.yaml").read_text() and (out / "net.png").is_file()
