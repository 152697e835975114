"""The unit tier: nothing trained, no server. The example models come with seeded initial weights here,
which is all a parser, a codec, a handler or the archiver needs (answers are checked against the same
weights run independently)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serveready.archiver import ModelSpec, build
from tests.conftest import unpack, untrained


@pytest.fixture(scope="session")
def net_spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    return untrained("net", tmp_path_factory, sharpen=1.0)


@pytest.fixture(scope="session")
def net_archive(net_spec: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(net_spec, tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="session")
def net_dir(net_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack(net_archive, tmp_path_factory.mktemp("unpacked"))


@pytest.fixture(scope="session")
def digits_spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    return untrained("digits", tmp_path_factory)


@pytest.fixture(scope="session")
def digits_archive(digits_spec: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(digits_spec, tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="session")
def digits_dir(digits_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack(digits_archive, tmp_path_factory.mktemp("unpacked"))
