"""A real TorchServe on free loopback ports, in its own run folder, stopped afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from serveready.scripts.runinfo import RunDir, TokenKind
from serveready.scripts.server import isolated, start, stop
from tests.conftest import ROOT

#: A plain TorchServe host: torch, torchserve and pyyaml only (`make test` builds it).
PLAIN = Path(os.environ.get("PLAIN_VENV", ROOT / ".venv-plain"))


def plain_launcher() -> Path:
    """The plain host's torchserve launcher; without it the test is skipped (failed on CI)."""
    launcher = PLAIN / "bin" / "torchserve"
    if not launcher.exists():
        message = f"no plain TorchServe environment at {PLAIN}: `make test` builds it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return launcher


@pytest.fixture(scope="session")
def serveready_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This library's wheel, built from a copy of the sources (an in-place build/ could carry files that no longer exist)."""
    base = tmp_path_factory.mktemp("wheel")
    source, dist = base / "source", base / "dist"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "artifacts", "model_store",
                                                                "run", "gpu-bundle", "gpu-out", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = dist.glob("serveready-*.whl")
    return wheel


@contextmanager
def serving(archives: list[Path], base: Path, torchserve: str | None = None) -> Iterator[RunDir]:
    """A TorchServe on free loopback ports whose model store holds ``archives``; stopped on exit."""
    store = base / "model_store"
    store.mkdir()
    for archive in archives:
        shutil.copy(archive, store)
    run = start(isolated(base / "run", store), torchserve=torchserve)
    try:
        yield run
    finally:
        stop(run.path)


@pytest.fixture(scope="session")
def server(net_archive: Path, digits_archive: Path, sentiment_archive: Path, spoken_digits_archive: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunDir]:
    """One TorchServe for the modules that register their own names on it (test_serve, test_digits, test_text, test_audio)."""
    with serving([net_archive, digits_archive, sentiment_archive, spoken_digits_archive], tmp_path_factory.mktemp("server")) as run:
        yield run


class Api:
    """Inference calls with the server's current inference key."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.session = requests.Session()

    def predict(
        self, model: str, payload: bytes | str, content_type: str = "application/json", token: str | None = "", endpoint: str = "predictions"
    ) -> requests.Response:
        key = self.run.token(TokenKind.INFERENCE) if token == "" else token
        headers = {"Content-Type": content_type}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return requests.post(f"{self.run.inference_url}/{endpoint}/{model}", data=payload, headers=headers, timeout=60)


@pytest.fixture(scope="session")
def api(server: RunDir) -> Api:
    return Api(server)
