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
from tools.bench import SYSTEMS


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
               "--warmup", "1", "--image", str(ROOT / "docs" / "images" / "digit.png"), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the repository's tools/, run from another folder
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]

    recorded = json.loads(out.with_suffix(".json").read_text())
    cells = {(c["system"], c["concurrency"]): c for c in recorded["cells"]["net"]}
    assert set(cells) == {(s, level) for s in SYSTEMS for level in (1, 4)}
    for key, cell in cells.items():  # every system answered, and answered right (wrk counts non-2xx as errors)
        assert cell["requests"] > 0 and cell["errors"] == 0, key
    page = out.read_text()
    assert "Targets, `project` (net):" in page and "| stock-tuned | 4 |" in page and out.with_suffix(".png").is_file()
