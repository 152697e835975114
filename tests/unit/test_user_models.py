"""Anyone's model from their own folder: named handlers, handlers of one's own, typed configs, training hooks, init."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from serveready.archiver import ArchiverError, ModelSpec, build, load_spec, load_specs
from serveready.archiver.build import build_all, is_built
from serveready.archiver.training import config_digest_path, is_stale
from serveready.scripts.archive import main as ts_archive
from tests.conftest import EXAMPLES, answer_without_library, reference_net, unpack

NET_MODEL = {"file": "models/net.py", "class": "Net", "kwargs": {"in_features": 10, "hidden": 20}, "sample_shape": [2, 10]}

MY_HANDLER = '''
from dataclasses import dataclass

from serveready.handlers import BatchHandler, Decoded, HandlerOptions, json_field, option, parse_rows


@dataclass(frozen=True, kw_only=True)
class ScaledOptions(HandlerOptions):
    scale: float = option(1.0, doc="multiplies every prediction")


class Helper:
    """A second class beside the handler: TorchServe alone would refuse this module."""


class ScaledHandler(BatchHandler):
    options_type = ScaledOptions

    def decode(self, request):
        return Decoded(parse_rows(json_field(request.json(), "inputs", "rows"), 10, 64))

    def encode(self, item, outputs):
        return {"scaled": (outputs * self.options.scale).tolist()}
'''

#: The same handler as serveready 0.2 documented it: decode(request, headers) over TorchServe's request dict.
OLD_HANDLER = MY_HANDLER.replace("json_field, option, parse_rows", "decode_json, json_field, option, parse_rows, request_body").replace(
    """    def decode(self, request):
        return Decoded(parse_rows(json_field(request.json(), "inputs", "rows"), 10, 64))""",
    """    def decode(self, request, headers):
        return Decoded(parse_rows(json_field(decode_json(request_body(request)), "inputs", "rows"), 10, 64))""")

#: A training hook of the user's own, with typed options.
MY_TRAINING = '''
from dataclasses import dataclass

import torch

from serveready.handlers import option


@dataclass(frozen=True, kw_only=True)
class Options:
    seed: int = option(0, minimum=0)
    epochs: int = option(3, minimum=1)
    lr: float = option(0.01, minimum=0)


def fit(job, options: Options):
    torch.manual_seed(options.seed)
    model = job.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=options.lr)
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(options.seed))
    for _ in range(options.epochs):
        optimizer.zero_grad()
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        loss.backward()
        optimizer.step()
    job.save(model, {"final_loss": loss.item()})
    if job.data_file is not None:
        job.save_data(x[:16], x[:16].sum(dim=1, keepdim=True), x[16:], x[16:].sum(dim=1, keepdim=True))
    return {"final_loss": loss.item()}
'''


def project(tmp_path: Path, net_spec: ModelSpec, configs: dict[str, dict], files: dict[str, str] | None = None) -> Path:
    """A user's folder: models/net.py, its trained weights, the given configs and files; nothing of this repo."""
    folder = tmp_path / "user"
    (folder / "models").mkdir(parents=True)
    (folder / "model_configs").mkdir()
    (folder / "artifacts").mkdir()
    shutil.copy(EXAMPLES / "net" / "models" / "net.py", folder / "models" / "net.py")
    shutil.copy(net_spec.weights, folder / "artifacts" / "mine.pt")
    for name, config in configs.items():
        (folder / "model_configs" / f"{name}.yaml").write_text(yaml.safe_dump(config))
    for name, text in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def mine(handler: dict, **more: object) -> dict:
    return {"name": "mine", "model": NET_MODEL, "weights": "artifacts/mine.pt", "handler": handler, **more}


ROW = [0.1, -0.2, 0.3, 0.0, 1.5, -1.0, 0.7, 0.2, -0.4, 0.9]


@pytest.mark.parametrize("entry", ["tabular", "handlers/tabular.py", "serveready.handlers.tabular:TabularHandler"])
def test_built_in_handlers_are_named_from_any_folder(entry: str, net_spec: ModelSpec, tmp_path: Path) -> None:
    """By name, by the path the README documented before names (no such file here), or by module and class."""
    folder = project(tmp_path, net_spec, {"mine": mine({"entry": entry, "input_width": 10})})
    archive = build(load_spec(folder / "model_configs" / "mine.yaml"), folder / "model_store")
    with zipfile.ZipFile(archive) as mar:
        assert "from serveready.handlers.tabular import TabularHandler as _Handler" in mar.read("serveready_entry.py").decode()
        assert not [n for n in mar.namelist() if n.startswith(("handlers/", "tabular"))]
    [answer] = answer_without_library(unpack(archive, tmp_path / "unpacked"), [json.dumps({"inputs": ROW}).encode()])
    np.testing.assert_allclose(answer["predictions"], reference_net(net_spec.weights, np.array([ROW], np.float32)), rtol=1e-5)


@pytest.mark.parametrize("entry", ["my_handler.py", "my_handler.py:ScaledHandler", "mine_pkg.scaled:ScaledHandler", "old_handler.py"])
def test_a_handler_of_ones_own_with_its_own_options(entry: str, net_spec: ModelSpec, tmp_path: Path) -> None:
    """Also a handler written for serveready 0.2 (decode(request, headers)): it is called that way."""
    files = {"my_handler.py": MY_HANDLER, "mine_pkg/__init__.py": "", "mine_pkg/scaled.py": MY_HANDLER, "old_handler.py": OLD_HANDLER}
    folder = project(tmp_path, net_spec, {"mine": mine({"entry": entry, "scale": 2.0})}, files)
    archive = build(load_spec(folder / "model_configs" / "mine.yaml"), folder / "model_store")
    with zipfile.ZipFile(archive) as mar:
        names = set(mar.namelist())
    assert ("mine_pkg/scaled.py" in names) == entry.startswith("mine_pkg") and ("my_handler.py" in names) == entry.startswith("my_handler")
    bodies = [json.dumps({"inputs": ROW}).encode(), b'{"inputs": [1, 2]}']
    good, bad = answer_without_library(unpack(archive, tmp_path / "unpacked"), bodies)
    np.testing.assert_allclose(good["scaled"], 2 * reference_net(net_spec.weights, np.array([ROW], np.float32)), rtol=1e-5)
    assert bad == {"code": 400, "type": "InvalidInput", "message": "row 0 has 2 values, expected 10"}


@pytest.mark.parametrize(
    ("handler", "files", "message"),
    [
        ({"entry": "my_handler.py", "scale": "two"}, {"my_handler.py": MY_HANDLER}, "handler.scale must be a number, got 'two'"),
        ({"entry": "my_handler.py", "scael": 2}, {"my_handler.py": MY_HANDLER}, "handler.scael is not a known key; did you mean 'scale'?"),
        ({"entry": "my_handler.py:Helper"}, {"my_handler.py": MY_HANDLER}, "Helper is not a subclass of serveready.handlers.BatchHandler"),
        ({"entry": "serveready.handlers:BatchHandler"}, {}, "BatchHandler does not define decode(request): it cannot read a request"),
        ({"entry": "json.py"}, {"json.py": MY_HANDLER}, "handler file json.py would shadow the module 'json' on the TorchServe worker"),
        ({"entry": "nothere.py"}, {}, "nothere.py does not exist"),
        ({"entry": "tabularr"}, {}, "is not a built-in handler (tabular, image_classifier, text_classifier, audio_classifier)"),
        ({"entry": "tabular", "input_width": "10"}, {}, "handler.input_width must be an int (or null), got '10'"),
        ({"entry": "tabular", "input_width": 9}, {}, "handler.input_width 9 differs from model.sample_shape [2, 10]"),
        ({"entry": "tabular", "max_rows": 0}, {}, "handler.max_rows must be at least 1, got 0"),
        ({"entry": "image_classifier"}, {}, "model.sample_shape must be [batch, channels (1 or 3), height, width] for image classifiers, got [2, 10]"),
    ],
)
def test_bad_handler_entries_and_options_fail_the_build_naming_the_key(handler: dict, files: dict, message: str, net_spec: ModelSpec, tmp_path: Path) -> None:
    folder = project(tmp_path, net_spec, {"mine": mine(handler)}, files)
    with pytest.raises(ArchiverError) as err:
        load_spec(folder / "model_configs" / "mine.yaml")
    assert err.value.message.startswith("mine.yaml: ") and message in err.value.message


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"training": {"recipe": "train.py:fit", "epochs": -1}}, "training.epochs must be at least 1, got -1"),
        ({"training": {"recipe": "train.py:fit", "lr": "fast"}}, "training.lr must be a number, got 'fast'"),
        ({"training": {"recipe": "train.py:fit", "batch": 8}}, "training.batch is not a known key"),
        ({"training": {"recipe": "magic"}}, "training.recipe must name a function in your folder, e.g. train.py:fit"),
        ({"training": {"recipe": "train.py:fitt"}}, "training.recipe 'train.py:fitt': no function 'fitt' there"),
        ({"training": {"recipe": "nothere.py:fit"}}, "training.recipe 'nothere.py:fit': "),
        ({"training": {"recipe": "digits", "epochs": 3}}, "training.recipe 'digits' was a recipe built into serveready 0.2"),
        ({"data": {"file": "data/x.pt"}}, "data.task is required"),
        ({"data": {"file": "data/x.pt", "task": "ranking"}}, "data.task must be one of 'classification', 'regression', got 'ranking'"),
        ({"handlr": {}}, "handlr is not a model config key"),
        ({"variant": {"kind": "int8_dynamic"}}, "variant needs base"),
        ({"model": {**NET_MODEL, "sample_shape": [10]}}, "model.sample_shape must be a list of at least two positive ints"),
        ({"model": {**NET_MODEL, "kwarg": {}}}, "model.kwarg is not a known key"),
    ],
)
def test_bad_sections_fail_naming_the_key(patch: dict, message: str, net_spec: ModelSpec, tmp_path: Path) -> None:
    folder = project(tmp_path, net_spec, {"mine": {**mine({"entry": "tabular"}), **patch}}, {"train.py": MY_TRAINING})
    with pytest.raises(ArchiverError) as err:
        load_spec(folder / "model_configs" / "mine.yaml")
    assert message in err.value.message


@pytest.mark.parametrize(
    ("variant", "fidelity", "message"),
    [
        ({"kind": "int4"}, {}, "variant.kind must be one of 'int8_dynamic', 'int8_static', 'half'"),
        ({"kind": "half"}, {}, "variant.dtype is required: one of 'float16', 'bfloat16'"),
        ({"kind": "pruned", "sparsity": 1.5}, {}, "variant.sparsity must be at most 0.99, got 1.5"),
        ({"kind": "pruned_structured", "layers": ["fc1"]}, {}, "variant.layers must name two Linear layers, got ['fc1']"),
        ({"kind": "int8_dynamic"}, {"max_abs_diff": "small"}, "fidelity.max_abs_diff must be a number (or null), got 'small'"),
        ({"kind": "int8_dynamic"}, {"max_accuracy_drop": 2}, "fidelity.max_accuracy_drop must be at most 1, got 2"),
    ],
)
def test_bad_variant_configs_fail_naming_the_key(variant: dict, fidelity: dict, message: str, net_spec: ModelSpec, tmp_path: Path) -> None:
    folder = project(tmp_path, net_spec, {"mine": mine({"entry": "tabular"}), "mine_v": {"name": "mine_v", "base": "mine", "variant": variant, "fidelity": fidelity}})
    with pytest.raises(ArchiverError) as err:
        load_spec(folder / "model_configs" / "mine_v.yaml")
    assert err.value.message.startswith("mine_v.yaml: ") and message in err.value.message


def test_without_training_or_data_it_builds_and_the_report_leaves_quality_out(net_spec: ModelSpec, tmp_path: Path) -> None:
    configs = {"mine": mine({"entry": "tabular"}), "mine_int8": {"name": "mine_int8", "base": "mine", "variant": {"kind": "int8_dynamic"}}}
    folder = project(tmp_path, net_spec, configs)
    before = {p for p in folder.rglob("*") if p.is_file()}
    built = build_all(load_specs(folder / "model_configs"), folder / "model_store")
    assert [p.name for p in built] == ["mine.mar", "mine_int8.mar"]
    written = {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()} - {p.relative_to(folder) for p in before}
    assert written == {Path("model_store/mine.mar"), Path("model_store/mine_int8.mar"), Path("model_store/report.json"), Path("model_store/report.md")}
    rows = {r["name"]: r for r in json.loads((folder / "model_store" / "report.json").read_text())["archives"]}
    assert not {"mse", "accuracy", "max_abs_diff"} & set(rows["mine"]) and rows["mine_int8"]["parameters"] == 241
    assert "| mine | fp32 |" in (folder / "model_store" / "report.md").read_text()


def test_held_out_data_of_ones_own_gives_quality_and_fidelity(net_spec: ModelSpec, tmp_path: Path) -> None:
    x = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    y = torch.tensor(reference_net(net_spec.weights, x.numpy()), dtype=torch.float32)
    configs = {
        "mine": mine({"entry": "tabular"}, data={"file": "data/heldout.pt", "task": "regression"}),
        "mine_fp16": {"name": "mine_fp16", "base": "mine", "variant": {"kind": "half", "dtype": "float16"}, "fidelity": {"max_abs_diff": 0.05}},
        "mine_small": {"name": "mine_small", "base": "mine", "variant": {"kind": "distilled"}, "model": {"kwargs": {"in_features": 10, "hidden": 4}}},
    }
    folder = project(tmp_path, net_spec, configs)
    (folder / "data").mkdir()
    torch.save({"x_test": x, "y_test": y}, folder / "data" / "heldout.pt")
    specs = {s.name: s for s in load_specs(folder / "model_configs")}
    build_all([specs["mine"], specs["mine_fp16"]], folder / "model_store")
    rows = {r["name"]: r for r in json.loads((folder / "model_store" / "report.json").read_text())["archives"]}
    assert rows["mine"]["mse"] < 1e-10 and 0 < rows["mine_fp16"]["max_abs_diff"] <= 0.05
    with pytest.raises(ArchiverError, match="mine_small: variant kind distilled needs training inputs: add x_train"):
        build(specs["mine_small"], folder / "model_store")


def test_a_fidelity_bound_without_data_is_refused(net_spec: ModelSpec, tmp_path: Path) -> None:
    configs = {"mine": mine({"entry": "tabular"}), "mine_int8": {"name": "mine_int8", "base": "mine", "variant": {"kind": "int8_dynamic"}, "fidelity": {"max_abs_diff": 0.3}}}
    folder = project(tmp_path, net_spec, configs)
    with pytest.raises(ArchiverError, match=r"mine_int8: fidelity bounds \(max_abs_diff\) need held-out data: give mine.yaml a data: file"):
        build(load_spec(folder / "model_configs" / "mine_int8.yaml"), folder / "model_store")
    assert not (folder / "model_store" / "mine_int8.mar").exists()


def test_staleness_counts_a_missing_input_as_changed(net_spec: ModelSpec, tmp_path: Path) -> None:
    configs = {"mine": {**mine({"entry": "tabular"}), "extra_files": ["notes.txt"]}, "mine_int8": {"name": "mine_int8", "base": "mine", "variant": {"kind": "int8_dynamic"}}}
    folder = project(tmp_path, net_spec, configs, {"notes.txt": "travels in the archive"})
    specs = {s.name: s for s in load_specs(folder / "model_configs")}
    build(specs["mine"], folder / "model_store")
    assert is_built(specs["mine"], folder / "model_store")
    (folder / "notes.txt").unlink()
    assert not is_built(specs["mine"], folder / "model_store")
    assert not is_stale(specs["mine"])  # the user's own weights: nothing to retrain
    variant = specs["mine_int8"]
    assert is_stale(variant)  # no weights yet
    variant.weights.parent.mkdir(exist_ok=True)
    variant.weights.write_bytes(b"x")
    assert not is_stale(variant)
    (folder / "model_configs" / "mine.yaml").unlink()  # the base's config is gone
    assert is_stale(variant)


def test_init_writes_a_commented_config_that_builds(net_spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    folder = project(tmp_path, net_spec, {})
    monkeypatch.chdir(folder)
    args = ["init", "mine", "--model-file", "models/net.py", "--class", "Net", "--input", "tabular", "--kwarg", "in_features=10", "--kwarg", "hidden=20"]
    assert ts_archive(args) == 0
    text = (folder / "model_configs" / "mine.yaml").read_text()
    for line in ("entry: tabular", "sample_shape: [2, 10]", "weights: artifacts/mine.pt", "kwargs: {hidden: 20, in_features: 10}", "# max_rows: 1024", "larger requests get 400"):
        assert line in text, line
    assert ts_archive(args) == 1 and "mine.yaml exists: edit it, or pass --force" in capsys.readouterr().err
    assert ts_archive(["build", "mine"]) == 0
    assert (folder / "model_store" / "mine.mar").is_file()
    image = ["init", "pic", "--model-file", "models/net.py", "--class", "Net", "--input", "image", "--kwarg", "in_features=10"]
    assert ts_archive(image) == 1 and "pass --sample-shape, e.g. --sample-shape 2 3 224 224" in capsys.readouterr().err
    wrong = ["init", "bad", "--model-file", "models/net.py", "--class", "Nett", "--input", "tabular"]
    assert ts_archive(wrong) == 1 and "defines no torch.nn.Module named 'Nett'" in capsys.readouterr().err
    assert not (folder / "model_configs" / "bad.yaml").exists()


def test_a_named_model_builds_beside_a_broken_config(net_spec: ModelSpec, tmp_path: Path) -> None:
    folder = project(tmp_path, net_spec, {"mine": mine({"entry": "tabular"}), "broken": {**mine({"entry": "tabular", "max_row": 3}), "name": "broken"}})
    assert [s.name for s in load_specs(folder / "model_configs", ["mine"])] == ["mine"]
    with pytest.raises(ArchiverError, match="broken.yaml: handler.max_row is not a known key; did you mean 'max_rows'?"):
        load_specs(folder / "model_configs")


def test_a_training_hook_of_ones_own_trains_saves_and_builds(net_spec: ModelSpec, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """training: {recipe: train.py:fit, ...}: ts-archive train runs it, the weights and data it saved build with quality."""
    config = mine({"entry": "tabular"}, training={"recipe": "train.py:fit", "epochs": 5}, data={"file": "data/mine.pt", "task": "regression"})
    folder = project(tmp_path, net_spec, {"mine": config}, {"train.py": MY_TRAINING})
    (folder / "artifacts" / "mine.pt").unlink()
    [spec] = load_specs(folder / "model_configs")
    assert spec.training is not None and spec.training.options.epochs == 5 and is_stale(spec)
    assert ts_archive(["--configs", str(folder / "model_configs"), "train"]) == 0
    metrics = json.loads((folder / "artifacts" / "mine.metrics.json").read_text())
    assert set(metrics) == {"final_loss"} and (folder / "data" / "mine.pt").is_file() and not is_stale(spec)
    first = (folder / "artifacts" / "mine.pt").read_bytes()
    assert ts_archive(["--configs", str(folder / "model_configs"), "train", "mine"]) == 0
    assert (folder / "artifacts" / "mine.pt").read_bytes() == first  # seeded: the same weights, byte for byte
    build_all([spec], folder / "model_store")
    rows = {r["name"]: r for r in json.loads((folder / "model_store" / "report.json").read_text())["archives"]}
    assert "mse" in rows["mine"] and rows["mine"]["heldout_rows"] == 16


def test_a_retuned_config_does_not_retrain_its_model(net_spec: ModelSpec, tmp_path: Path) -> None:
    """ts-archive tune rewrites serve: and handler.torch_threads, which training never reads: the next
    `ts-archive train --if-stale` (make mar) keeps the weights; a change to anything else retrains."""
    config = mine({"entry": "tabular"}, training={"recipe": "train.py:fit", "epochs": 2})
    folder = project(tmp_path, net_spec, {"mine": config}, {"train.py": MY_TRAINING})
    source = folder / "model_configs" / "mine.yaml"
    [spec] = load_specs(folder / "model_configs")
    assert ts_archive(["--configs", str(folder / "model_configs"), "train", "mine"]) == 0
    assert not is_stale(spec)

    def rewrite(changed: dict) -> None:
        source.write_text("# tuned: a comment above serve:\n" + yaml.safe_dump(changed))
        later = spec.weights.stat().st_mtime + 10
        os.utime(source, (later, later))

    rewrite({**config, "handler": {"entry": "tabular", "torch_threads": 2}, "serve": {"minWorkers": 2, "batchSize": 16}})
    assert not is_stale(spec)  # newer, but only in what the tuner writes
    rewrite({**config, "handler": {"entry": "tabular", "top_k": 3}})
    assert is_stale(spec)  # a handler option other than torch_threads: the digest no longer matches
    rewrite({**config, "training": {"recipe": "train.py:fit", "epochs": 3}})
    assert is_stale(spec)
    rewrite(config)
    assert not is_stale(spec)  # back to what trained it
    config_digest_path(spec.weights).unlink()
    assert is_stale(spec)  # weights trained before digests were recorded: the file time decides, as before
    source.write_text("serve: [unclosed\n")
    os.utime(source, (spec.weights.stat().st_mtime + 20,) * 2)
    assert is_stale(spec)  # unreadable: the run that follows names the error
