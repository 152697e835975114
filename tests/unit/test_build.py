"""The archiver: verified, self-contained archives, and clear refusals."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from serveready.archiver import ArchiverError, ModelSpec, build, load_spec, verify
from serveready.archiver.build import model_config
from serveready.archiver.spec import ServeOptions
from tests.conftest import EXAMPLES, answer_without_library, digits_model, reference_net

ROOT = Path(__file__).resolve().parents[2]
#: sklearn's digits.images[0], a zero.
ZERO_DIGIT = [[0, 0, 5, 13, 9, 1, 0, 0], [0, 0, 13, 15, 10, 15, 5, 0], [0, 3, 15, 2, 0, 11, 8, 0], [0, 4, 12, 0, 0, 8, 8, 0],
              [0, 5, 8, 0, 0, 9, 8, 0], [0, 4, 11, 0, 1, 12, 7, 0], [0, 2, 14, 5, 10, 12, 0, 0], [0, 0, 6, 13, 10, 0, 0, 0]]


def test_archive_holds_model_weights_config_and_handlers(net_archive: Path, net_spec: ModelSpec) -> None:
    with zipfile.ZipFile(net_archive) as mar:
        names = set(mar.namelist())
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(mar.read("model-config.yaml"))
        weights = mar.read("net.pt")
    assert {"net.py", "net.pt", "serveready_entry.py", "model-config.yaml", "serveready/__init__.py", "serveready/handlers/base.py",
            "serveready/handlers/engine.py", "serveready/handlers/torchserve.py", "serveready/handlers/payload.py"} <= names
    assert not any(n.endswith(".pyc") for n in names)
    assert manifest["model"] == {
        "modelName": "net",
        "serializedFile": "net.pt",
        "handler": "serveready_entry.py",
        "modelFile": "net.py",
        "modelVersion": "1.0",
        "configFile": "model-config.yaml",
    }
    assert config["minWorkers"] == net_spec.serve.minWorkers and config["deviceType"] == "cpu"  # serve: as written (tuned)
    assert config["model"] == {"format": "eager", "class_name": "Net", "kwargs": {"in_features": 10, "hidden": 20}, "sample_shape": [2, 10]}
    assert config["handler"] == {"torch_threads": 1, "ig_steps": 50, "metrics": True, "fold_batchnorm": False, "channels_last": False,
                                 "input_width": 10, "max_rows": 1024}
    assert config["serveready"] == {"version": "0.3.0", "handler": "serveready.handlers.tabular:TabularHandler"}
    assert weights == net_spec.weights.read_bytes()  # the state_dict itself, not a pickled module


def test_wrong_hidden_size_fails_at_build_naming_file_and_mismatch(net_spec: ModelSpec, tmp_path: Path) -> None:
    wrong = dataclasses.replace(net_spec, model_kwargs={"in_features": 10, "hidden": 21})
    with pytest.raises(ArchiverError) as err:
        build(wrong, tmp_path)
    assert "weights file net.pt does not fit Net" in err.value.message
    assert "size mismatch for fc1.weight" in err.value.message and "[21, 10]" in err.value.message
    assert not (tmp_path / "net.mar").exists()


def test_wrong_sample_shape_fails_at_build(net_spec: ModelSpec) -> None:
    with pytest.raises(ArchiverError, match=r"fails on a sample input of shape \[2, 9\]"):
        verify(dataclasses.replace(net_spec, sample_shape=(2, 9)))


def test_a_pickled_module_is_refused(net_spec: ModelSpec, tmp_path: Path) -> None:
    pickled = tmp_path / "whole_model.pt"
    model = verify(net_spec)
    torch.save(model, pickled)  # a whole pickled module, as the article sometimes does
    with pytest.raises(ArchiverError, match="whole_model.pt is not a loadable state_dict"):
        verify(dataclasses.replace(net_spec, weights=pickled))


def test_missing_weights_says_to_train(net_spec: ModelSpec, tmp_path: Path) -> None:
    with pytest.raises(ArchiverError, match=r"does not exist \(run `ts-archive train net` first\)"):
        verify(dataclasses.replace(net_spec, weights=tmp_path / "none.pt"))


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"name": "bad name"}, "name 'bad name' must match"),
        ({"serve": {"batchSize": 0}}, "serve.batchSize must be at least 1, got 0"),
        ({"serve": {"deviceType": "tpu"}}, "serve.deviceType must be one of 'cpu', 'gpu', got 'tpu'"),
        ({"serve": {"workers": 2}}, "serve.workers is not a known key"),
        ({"serve": {"minWorkers": 3, "maxWorkers": 2}}, "serve.minWorkers (3) exceeds serve.maxWorkers (2)"),
        ({"handler": {}}, "missing required key 'handler.entry'"),
    ],
)
def test_bad_configs_are_refused(tmp_path: Path, patch: dict, message: str) -> None:
    raw = yaml.safe_load((ROOT / "model_configs" / "net.yaml").read_text())
    raw.update(patch)
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ArchiverError) as err:
        load_spec(path, root=EXAMPLES / "net")
    assert message in err.value.message


@pytest.mark.parametrize(
    ("archive", "handler", "body"),
    [
        ("net_dir", "serveready_entry.py", b'{"inputs": [0,0,0,0,0,0,0,0,0,0]}'),
        ("digits_dir", "serveready_entry.py", json.dumps({"inputs": ZERO_DIGIT}).encode()),
    ],
)
def test_archive_serves_without_this_library_or_numpy(archive: str, handler: str, body: bytes, request: pytest.FixtureRequest) -> None:
    """Load the archive as a TorchServe worker does, with torch and ts but not this repo, nor numpy."""
    assert handler == "serveready_entry.py"
    folder = request.getfixturevalue(archive)
    [answer] = answer_without_library(folder, [body])
    if archive == "net_dir":
        np.testing.assert_allclose(answer["predictions"], reference_net(folder / "net.pt", np.zeros((1, 10), np.float32)), rtol=1e-5, atol=1e-6)
    else:
        with torch.inference_mode():
            expected = int(digits_model(folder / "digits.pt")(torch.tensor(ZERO_DIGIT, dtype=torch.float32).reshape(1, 1, 8, 8) / 16).argmax())
        assert answer["predictions"][0]["index"] == expected and len(answer["predictions"]) == 3


#: model_configs/net.yaml as the README documented it before handlers had names.
README_0_1_CONFIG = """
name: net
version: "1.0"
model:
  file: models/net.py          # shipped in the archive; imports only torch
  class: Net
  kwargs: {in_features: 10, hidden: 20}
  sample_shape: [2, 10]        # build-time check: one forward on zeros of this shape
weights: artifacts/net.pt      # state_dict only
handler:
  entry: handlers/tabular.py
  input_width: 10
  max_rows: 1024
  torch_threads: 1             # per worker (default: cores / maxWorkers)
training: {recipe: regression, seed: 0, samples: 2000, holdout: 0.2, noise: 0.1, epochs: 300, lr: 0.05}
serve:                         # TorchServe model-config keys, copied into the archive
  minWorkers: 1
  maxWorkers: 1
  batchSize: 8
  maxBatchDelay: 20
  responseTimeout: 30
  deviceType: cpu
"""


def test_the_config_format_the_readme_documented_still_builds(net_spec: ModelSpec, tmp_path: Path) -> None:
    """0.1's handler path still names the built-in; 0.2's built-in recipe gets an error that shows the new form."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "net.yaml").write_text(README_0_1_CONFIG)
    with pytest.raises(ArchiverError) as err:
        load_spec(tmp_path / "configs" / "net.yaml", root=EXAMPLES / "net")
    assert err.value.message.startswith("net.yaml: training.recipe 'regression' was a recipe built into serveready 0.2")
    assert "training: {recipe: train.py:fit, ...} (this repo's: examples/net/train.py:fit" in err.value.message
    (tmp_path / "configs" / "net.yaml").write_text(README_0_1_CONFIG.replace("training: {recipe: regression", "# training: {recipe: regression"))
    spec = dataclasses.replace(load_spec(tmp_path / "configs" / "net.yaml", root=EXAMPLES / "net"), weights=net_spec.weights)
    assert spec.handler.module == "serveready.handlers.tabular" and spec.training is None
    with zipfile.ZipFile(build(spec, tmp_path / "store")) as mar:
        assert yaml.safe_load(mar.read("model-config.yaml"))["handler"]["input_width"] == 10


def test_delay_zero_batching_is_written_so_plain_torchserve_cannot_misread_it(net_spec: ModelSpec) -> None:
    """TorchServe 0.12 reads maxBatchDelay 0 in an archive as unset (default 100 ms): never write it there."""
    queued = model_config(dataclasses.replace(net_spec, serve=ServeOptions(minWorkers=2, maxWorkers=2, batchSize=8, maxBatchDelay=0)))
    assert (queued["batchSize"], "maxBatchDelay" in queued) == (1, False)  # plain TorchServe: no batching, no wait
    assert queued["register"] == {"batchSize": 8, "maxBatchDelay": 0}  # what ts-manage register passes explicitly
    waiting = model_config(dataclasses.replace(net_spec, serve=ServeOptions(batchSize=8, maxBatchDelay=5)))
    assert (waiting["batchSize"], waiting["maxBatchDelay"], "register" in waiting) == (8, 5, False)


def test_archives_queue_a_thousand_requests_unless_told(net_spec: ModelSpec) -> None:
    """TorchServe's own 100 answers 503 to every request beyond it: archives carry 1000, or the config's own."""
    assert model_config(net_spec)["jobQueueSize"] == 1000
    assert model_config(dataclasses.replace(net_spec, serve=ServeOptions(jobQueueSize=50)))["jobQueueSize"] == 50
