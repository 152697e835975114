"""The Triton exit: a model repository from the same configs, parsed with Triton's own protobufs, run with ONNX Runtime."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from serveready.archiver import ArchiverError, ModelSpec
from serveready.archiver.triton import export
from serveready.scripts.archive import main as ts_archive
from tests.conftest import VariantBuild, digits_model, digits_split, reference_net


def _config(folder: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _run(folder: Path, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": inputs})[0]


def test_net_exports_a_repository_triton_reads_and_onnx_runtime_runs(net_spec: ModelSpec, tmp_path: Path) -> None:
    folder = export(net_spec, tmp_path / "repo")
    assert sorted(p.relative_to(tmp_path / "repo").as_posix() for p in folder.rglob("*")) == ["net/1", "net/1/model.onnx", "net/config.pbtxt"]
    config = _config(folder)
    assert (config.name, config.backend, config.max_batch_size) == ("net", "onnxruntime", 1024)
    [tensor_in], [tensor_out] = config.input, config.output
    assert (tensor_in.name, tensor_in.data_type, list(tensor_in.dims)) == ("input", model_config_pb2.TYPE_FP32, [10])
    assert (tensor_out.name, list(tensor_out.dims)) == ("output", [1])
    assert config.dynamic_batching.max_queue_delay_microseconds == 0  # net's maxBatchDelay 0
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    rows = np.random.default_rng(4).normal(size=(37, 10)).astype(np.float32)
    np.testing.assert_allclose(_run(folder, rows), reference_net(net_spec.weights, rows), atol=1e-5)


def test_digits_export_matches_the_fp32_model_and_follows_serve_settings(digits_spec: ModelSpec, tmp_path: Path) -> None:
    serve = dataclasses.replace(digits_spec.serve, batchSize=8, maxBatchDelay=5, maxWorkers=1, minWorkers=1)
    folder = export(dataclasses.replace(digits_spec, serve=serve), tmp_path / "repo")
    config = _config(folder)
    assert list(config.input[0].dims) == [1, 8, 8] and list(config.output[0].dims) == [10]
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000 and config.instance_group[0].count == 1
    images = digits_split()["x_test"][:50]
    with torch.inference_mode():
        expected = digits_model(digits_spec.weights)(images).numpy()
    np.testing.assert_allclose(_run(folder, images.numpy()), expected, atol=1e-4)


def test_variants_without_eager_weights_are_refused_with_what_to_do(variant_builds: dict[str, VariantBuild], tmp_path: Path) -> None:
    with pytest.raises(ArchiverError, match="net_int8: a Triton export starts from eager torch weights; int8_dynamic variants cannot: export net instead"):
        export(variant_builds["net_int8"].spec, tmp_path)


def test_the_command_exports_every_model_that_is_no_variant(net_spec: ModelSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from tests.conftest import EXAMPLES

    for part in ("model_configs/net.yaml", "model_configs/net_int8.yaml", "models/net.py", "train.py"):
        (tmp_path / part).parent.mkdir(exist_ok=True)
        shutil.copy(EXAMPLES / "net" / part, tmp_path / part)
    (tmp_path / "artifacts").mkdir()
    shutil.copy(net_spec.weights, tmp_path / "artifacts" / "net.pt")
    assert ts_archive(["--configs", str(tmp_path / "model_configs"), "triton", "--out", str(tmp_path / "repo")]) == 0
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["net"]  # the int8 variant is no Triton model
    assert "Triton model repository" in capsys.readouterr().out
