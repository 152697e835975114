"""The library as a user gets it: a wheel in a fresh virtualenv, the breast-cancer walk-through in a folder of its own.

The folder holds a copy of examples/breast_cancer and nothing of this repository; its
commands run on the fresh virtualenv's Python and console scripts, its archives are
served by the plain TorchServe host (.venv-plain: torch, torchserve, pyyaml only), and
the answers are checked against the model computed here, in-process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from serveready.scripts.runinfo import RunDir
from serveready.scripts.server import free_ports
from tests.conftest import ROOT
from tests.e2e.conftest import Api, plain_launcher

#: The README's "Package your own model" commands, run as written (the README is checked to hold them).
WALKTHROUGH = [
    "python train.py",
    "ts-archive init bc --model-file models/bc.py --class BreastCancerNet --input tabular --data data/bc.pt",
    "ts-archive build",
]
SERVE = ["ts-manage register bc.mar", "ts-manage register bc_int8.mar"]


def _run(command: str, venv: Path, cwd: Path, extra_env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TS_RUN_DIR")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra_env or {})
    done = subprocess.run(shlex.split(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def venv(serveready_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the built wheel installed (torch pinned first, as the README says)."""
    base = tmp_path_factory.mktemp("venv")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True, capture_output=True, timeout=900)
    subprocess.run([*pip, str(serveready_wheel), "scikit-learn"], check=True, capture_output=True, timeout=900)
    return venv


@pytest.fixture(scope="module")
def folder(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's folder after the walk-through's commands."""
    folder = tmp_path_factory.mktemp("user") / "bc"
    shutil.copytree(ROOT / "examples" / "breast_cancer", folder)
    for command in WALKTHROUGH:
        before = {p for p in folder.rglob("*") if p.is_file()}
        _run(command, venv, folder)
        if command == "ts-archive build":  # nothing written outside the store
            assert {p.relative_to(folder).parts[0] for p in set(folder.rglob("*")) - before if p.is_file()} == {"model_store"}
    return folder


@pytest.fixture(scope="module")
def served(venv: Path, folder: Path) -> Iterator[RunDir]:
    launcher = plain_launcher()
    names = ("TS_INFERENCE_PORT", "TS_MANAGEMENT_PORT", "TS_METRICS_PORT", "TS_GRPC_INFERENCE_PORT", "TS_GRPC_MANAGEMENT_PORT")
    ports = {name: str(port) for name, port in zip(names, free_ports(5), strict=True)}
    env = {**ports, "TS_RUN_DIR": str(folder / "run")}
    _run(f"ts-server start --torchserve {launcher}", venv, folder, env)
    try:
        for command in SERVE:
            _run(command, venv, folder, env)
        yield RunDir(folder / "run")
    finally:
        _run("ts-server stop", venv, folder, env)


def test_the_venv_has_the_wheel_not_the_repo(venv: Path, tmp_path: Path) -> None:
    done = subprocess.run([str(venv / "bin" / "python"), "-c", "import serveready, serveready.handlers; print(serveready.__file__)"],
                          cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "site-packages" in done.stdout and str(ROOT) not in done.stdout
    for name in ("handlers", "archiver", "scripts"):  # nothing installed under a bare name
        missing = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {name}"], cwd=tmp_path, capture_output=True)
        assert missing.returncode != 0, name


def test_the_readme_shows_these_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    for command in [*WALKTHROUGH, *SERVE, "ts-server start"]:
        assert command in readme, command


def _model(folder: Path) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("bc_reference", folder / "models" / "bc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.BreastCancerNet()
    model.load_state_dict(torch.load(folder / "artifacts" / "bc.pt", weights_only=True))
    return model.eval()


def test_the_report_lands_beside_the_archives(folder: Path) -> None:
    report = json.loads((folder / "model_store" / "report.json").read_text())
    rows = {r["name"]: r for r in report["archives"]}
    assert set(rows) == {"bc", "bc_int8"} and (folder / "model_store" / "report.md").is_file()
    data = torch.load(folder / "data" / "bc.pt", weights_only=True)
    with torch.inference_mode():
        accuracy = (_model(folder)(data["x_test"]).argmax(dim=1) == data["y_test"]).float().mean().item()
    assert rows["bc"]["accuracy"] == pytest.approx(accuracy) and accuracy > 0.93
    assert rows["bc_int8"]["max_abs_diff"] <= 0.2


def test_the_plain_host_answers_like_the_model_in_process(served: RunDir, folder: Path) -> None:
    data = torch.load(folder / "data" / "bc.pt", weights_only=True)
    rows = data["x_test"][:6]
    with torch.inference_mode():
        expected = _model(folder)(rows).numpy()
    api = Api(served)
    reply = api.predict("bc", json.dumps({"inputs": rows.tolist()}))
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(reply.json()["predictions"], expected, rtol=1e-5, atol=1e-5)
    quantized = api.predict("bc_int8", json.dumps({"inputs": rows.tolist()}))
    assert quantized.status_code == 200 and np.array(quantized.json()["predictions"]).shape == expected.shape
    bad = api.predict("bc", json.dumps({"inputs": rows[0, :29].tolist()}))
    assert (bad.status_code, bad.json()["message"]) == (400, "row 0 has 29 values, expected 30")


#: The README's in-process lines, run in the fresh virtualenv (one request on stdin, the answer's bytes on stdout).
IN_PROCESS = """
import sys
import serveready
with serveready.load("model_store/bc.mar") as model:
    answer = model.predict(sys.stdin.buffer.read(), content_type="application/json")
sys.stdout.write(f"{answer.status} {answer.content_type}\\n")
sys.stdout.flush()
sys.stdout.buffer.write(answer.body)
"""


def test_load_in_the_wheels_venv_answers_as_the_plain_host(venv: Path, served: RunDir, folder: Path) -> None:
    """The README's serveready.load snippet: the same bytes as the plain TorchServe host, for a good and a bad request."""
    rows = torch.load(folder / "data" / "bc.pt", weights_only=True)["x_test"]
    for body in (json.dumps({"inputs": rows[0].tolist()}), json.dumps({"inputs": rows[0, :29].tolist()})):
        done = subprocess.run([str(venv / "bin" / "python"), "-c", IN_PROCESS], cwd=folder, input=body.encode(), capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        head, _, answer = done.stdout.partition(b"\n")
        reply = Api(served).predict("bc", body)
        assert head.decode() == f"{reply.status_code} application/json" and answer == reply.content
    assert "serveready.load(\"model_store/bc.mar\")" in (ROOT / "README.md").read_text()
