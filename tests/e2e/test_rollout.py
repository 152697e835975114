"""`ts-manage rollout`: a new version of a model takes over its traffic on a real TorchServe, no request lost.

The tests share one server and run in order: 1.0 → 2.0 → (3.0 broken, refused) → 3.0 kept beside 2.0.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from serveready.archiver import ModelSpec
from serveready.archiver.build import build
from serveready.scripts.client import Inference
from serveready.scripts.runinfo import RunDir
from tests.conftest import reference_net, repack
from tests.e2e.conftest import serving
from tests.e2e.test_faults import ROWS, Load
from tests.e2e.test_serve import ts_manage
from tests.e2e.test_trust import _wrong_shapes


@pytest.fixture(scope="module")
def versions(net_spec: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """net 2.0 and 3.0: the same model with other weights, as a retrained model would be (archive, weights)."""
    base = tmp_path_factory.mktemp("versions")
    built = {}
    for version, factor in (("2.0", 2.0), ("3.0", -1.0)):
        (base / version / "store").mkdir(parents=True)
        weights = base / version / net_spec.weights.name
        torch.save({k: v * factor for k, v in torch.load(net_spec.weights, weights_only=True).items()}, weights)
        built[version] = (build(dataclasses.replace(net_spec, version=version, weights=weights), base / version / "store"), weights)
    return built


@pytest.fixture(scope="module")
def live(net_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunDir]:
    with serving([net_archive], tmp_path_factory.mktemp("rollout")) as run:
        assert ts_manage(run, "register", "net.mar").returncode == 0
        yield run


def _expected(weights: Path) -> float:
    return float(reference_net(weights, ROWS[:1])[0][0])


def _predict(run: RunDir) -> float:
    reply = Inference.from_run(run).post("net", json.dumps({"inputs": ROWS[:1].tolist()}).encode(), "application/json")
    assert reply.status_code == 200, reply.text
    return reply.json()["predictions"][0][0]


def _versions(run: RunDir) -> list[str]:
    done = ts_manage(run, "describe", "net", "all")
    assert done.returncode == 0, done.stderr
    return [v["modelVersion"] for v in json.loads(done.stdout)]


def test_a_new_version_takes_over_under_load_without_losing_a_request(live: RunDir, net_spec: ModelSpec, versions: dict) -> None:  # noqa: ANN001
    archive, weights = versions["2.0"]
    (live.model_store / "net.mar").write_bytes(archive.read_bytes())  # rebuilt in place, as `ts-archive build` does
    with Load(live, "net", 8, [reference_net(net_spec.weights, ROWS), reference_net(weights, ROWS)], helper=False) as load:
        done = ts_manage(live, "rollout", "net", "net.mar")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("rolled out net 2.0 from net.mar: 2 CPU worker(s) READY")
    assert "default now 2.0 (was 1.0); unregistered 1.0" in done.stdout
    seen = load.seen  # no retries: a lost request shows as a status other than 200, or as hung
    assert set(seen.statuses) == {200} and seen.hung == seen.wrong == 0, seen
    assert seen.matched[0] > 0 and seen.matched[1] > 0, seen  # answered by 1.0, then by 2.0
    assert _versions(live) == ["2.0"]


def test_a_version_already_registered_is_refused_before_anything_changes(live: RunDir) -> None:
    done = ts_manage(live, "rollout", "net", "net.mar")
    assert done.returncode == 1
    assert "net version 2.0 is already registered (registered: 2.0): give the new archive another version" in done.stderr


def test_a_new_version_that_cannot_start_leaves_the_old_one_serving(live: RunDir, versions: dict) -> None:  # noqa: ANN001
    archive, _ = versions["3.0"]
    repack(archive, live.model_store / "net-3.0-broken.mar", _wrong_shapes)
    with Load(live, "net", 8, [reference_net(versions["2.0"][1], ROWS)], helper=False) as load:
        done = ts_manage(live, "rollout", "net", "net-3.0-broken.mar")
    assert done.returncode == 1
    assert "'net' version 3.0 is not registered; the worker said:" in done.stderr and "does not fit" in done.stderr
    assert _versions(live) == ["2.0"]
    seen = load.seen
    assert set(seen.statuses) == {200} and seen.hung == seen.wrong == 0 and seen.matched[0] > 0, seen


def test_keep_old_leaves_a_way_back(live: RunDir, versions: dict) -> None:  # noqa: ANN001
    archive, weights = versions["3.0"]
    (live.model_store / "net-3.0.mar").write_bytes(archive.read_bytes())
    done = ts_manage(live, "rollout", "net", "net-3.0.mar", "--workers", "1", "--keep-old")
    assert done.returncode == 0, done.stderr
    assert "default now 3.0 (was 2.0); 2.0 still registered (back: ts-manage set-default net 2.0)" in done.stdout
    assert sorted(_versions(live)) == ["2.0", "3.0"]
    assert _predict(live) == pytest.approx(_expected(weights), rel=1e-4, abs=1e-4)
    assert ts_manage(live, "set-default", "net", "2.0").returncode == 0
    assert _predict(live) == pytest.approx(_expected(versions["2.0"][1]), rel=1e-4, abs=1e-4)


def test_rollout_over_a_model_that_is_not_registered_says_to_register(live: RunDir) -> None:
    done = ts_manage(live, "rollout", "nothing_here", "net.mar")
    assert done.returncode == 1
    assert "model 'nothing_here' is not registered, so there is nothing to roll out over: ts-manage register net.mar --name nothing_here" in done.stderr


def test_register_over_a_registered_name_points_at_rollout(live: RunDir) -> None:
    done = ts_manage(live, "register", "net.mar")
    assert done.returncode == 1 and "or replace it without downtime: ts-manage rollout net net.mar" in done.stderr
