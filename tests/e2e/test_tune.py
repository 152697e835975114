"""The tuner and the load generator against a real TorchServe (no timings asserted: benchmarks are not tests)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from serveready.archiver.tune import Candidate, SweepPlan, sweep


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
