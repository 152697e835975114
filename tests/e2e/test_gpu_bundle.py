"""The GPU bundle as a lent machine uses it: unpacked by scripts/gpu_device_run.sh, served from its own copies.

This machine has no GPU, so the run is ts-gpu-check's CPU mode; what is checked is what a GPU
session cannot afford to find out there: that the bundle holds everything, that TorchServe, this
library and Java come from the bundle and not from the environment, and that the report and the
workers' logs come back under $OUT. The "GPU machine" is a fresh virtualenv holding what such a
machine has (torch, numpy, pillow, pyyaml) and nothing else: no TorchServe, requests, psutil or pytest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tools.gpu_bundle import CORE, FALLBACK, TS_JAR, build_bundle


@pytest.fixture(scope="module")
def foreign_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python with torch and little else, as on the lent GPU machines."""
    venv = tmp_path_factory.mktemp("host") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "torch==2.13.0", "numpy", "pillow", "pyyaml"],
                   check=True, capture_output=True, timeout=900)
    return venv / "bin" / "python"


def test_bundle_runs_the_check_from_its_own_copies(serveready_wheel: Path, net_archive: Path, foreign_python: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(net_archive, store)
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    said: list[str] = []
    manifest = build_bundle(store, serveready_wheel, bundle, preset=0, say=said.append)

    assert sorted(p.name for p in bundle.iterdir()) == ["MANIFEST.json", "jre.tar.xz", "model_store", "site.tar.xz"]
    assert manifest["archives"] == ["net.mar"] and json.loads((bundle / "MANIFEST.json").read_text())["archives"] == ["net.mar"]
    assert set(manifest["versions"]) == {*CORE, *FALLBACK}  # type: ignore[arg-type]
    assert said[-1].endswith("MiB in all")
    with tarfile.open(bundle / "site.tar.xz") as tar:
        names = set(tar.getnames())
        jar = tar.extractfile(f"site/{TS_JAR}")
        assert jar is not None and jar.read(8)[:4] == b"PK\x03\x04"
    assert "site/serveready/handlers/base.py" in names and "site/ts/model_server.py" in names and "site/captum/__init__.py" in names
    for name, module in FALLBACK.items():  # each fallback package holds the module it is installed for
        assert f"site/fallback/{name}/{module}/__init__.py" in names or f"site/fallback/{name}/{module}.py" in names, name

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAVA_HOME", "TS_RUN_DIR")}
    env.update(BUNDLE=str(bundle), OUT=str(out), PYTHON=str(foreign_python), TMPDIR=str(tmp_path))
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_device_run.sh"), "--device", "cpu", "--clients", "2", "--requests", "3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("requests", "psutil", "pytest", "Pygments"):  # what the host lacked came from the bundle
        assert f"  {name}: from the bundle" in done.stderr

    environment = (out / "environment.txt").read_text()
    for module in ("ts", "serveready", "serveready.handlers", "serveready.scripts"):  # the bundle's copies, not this environment's
        line = next(x for x in environment.splitlines() if x.startswith(f"{module} "))
        assert "/serveready-gpu." in line and "/site/" in line, line
    assert f"torch 2.13.0+cpu from {foreign_python.parent.parent}" in environment  # the host's own torch
    assert "openjdk version" in environment
    assert sorted(x.split(":")[0] for x in environment.splitlines() if "MISSING" in x) == ["captum", "matplotlib", "onnxruntime", "sklearn"]
    report = json.loads((out / "check.json").read_text())
    [check] = report["archives"]
    assert (check["name"], check["outcome"]) == ("net", "served") and check["measure"]["max_abs_diff_vs_cpu"] <= 1e-5
    assert "model net runs with torch float32 on cpu" in (out / "logs" / "model_log.log").read_text()
    assert (out / "gpu-tests.txt").read_text().count("SKIPPED") >= 1  # collected and skipped: no CUDA here
    assert not list(tmp_path.glob("serveready-gpu.*"))  # the unpacked copy is removed
