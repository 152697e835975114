"""``ts-archive ray``: the Serve config it writes is one Ray's own schema accepts, with each archive's replicas."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from serveready.archiver.errors import ArchiverError
from serveready.archiver.ray_config import serve_config
from serveready.handlers.archive import Archive
from serveready.scripts.archive import main as ts_archive

schema = pytest.importorskip("ray.serve.schema", reason="pip install 'serveready[ray]'")


def test_the_config_is_valid_for_serve_deploy_and_carries_each_archives_replicas(net_archive: Path, digits_archive: Path, tmp_path: Path) -> None:
    store = tmp_path / "model_store"
    store.mkdir()
    for archive in (net_archive, digits_archive):
        shutil.copy(archive, store / archive.name)
    out = tmp_path / "serve_config.yaml"
    assert ts_archive(["ray", "--store", str(store), "--out", str(out), "--port", "8123"]) == 0
    document = yaml.safe_load(out.read_text())
    parsed = schema.ServeDeploySchema.model_validate(document)  # what `serve deploy` validates
    [app] = parsed.applications
    assert (app.import_path, app.route_prefix, parsed.http_options.host, parsed.http_options.port) == ("serveready.ray:app", "/", "127.0.0.1", 8123)
    assert app.args == {"store": str(store.resolve()), "num_cpus": 0.25}
    replicas = {d.name: d.num_replicas for d in app.deployments}
    assert replicas == {"digits": Archive(store / "digits.mar").workers[0], "net": Archive(store / "net.mar").workers[0]}


def test_names_pick_archives_and_missing_ones_are_named(net_archive: Path, tmp_path: Path) -> None:
    shutil.copy(net_archive, tmp_path / "net.mar")
    assert serve_config(tmp_path, ["net"])["applications"][0]["args"]["models"] == "net"
    with pytest.raises(ArchiverError, match=r"no other\.mar in"):
        serve_config(tmp_path, ["net", "other"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArchiverError, match="no .mar archives in"):
        serve_config(tmp_path / "empty", [])
    with pytest.raises(ArchiverError, match="is not a folder"):  # the same store listing as the hosts'
        serve_config(tmp_path / "nowhere", [])


def test_replicas_override_every_archives_workers_and_the_proxy_times_out(net_archive: Path, tmp_path: Path) -> None:
    shutil.copy(net_archive, tmp_path / "net.mar")
    assert Archive(tmp_path / "net.mar").workers != (1, 1)
    config = serve_config(tmp_path, [], replicas=1)
    parsed = schema.ServeDeploySchema.model_validate(config)
    assert [d.num_replicas for d in parsed.applications[0].deployments] == [1]
    assert parsed.http_options.request_timeout_s == 120  # TorchServe's default_response_timeout: no request waits forever
    with pytest.raises(ArchiverError, match="--replicas must be at least 1, got 0"):
        serve_config(tmp_path, [], replicas=0)
