"""Every archive's handler on cuda:0 through TorchServe's own Context, against CPU references.

Skipped where torch has no CUDA; `make gpu-check` runs them on a machine with a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from serveready.archiver import ModelSpec
from serveready.handlers.loaders import CPU_ONLY_FORMATS
from tests.conftest import VariantBuild, digits_model, digits_split, handled, reference_net, served, unpack

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no CUDA here")]

NET = ["net_int8", "net_fp16", "net_bf16", "net_pruned", "net_pruned_structured", "net_distilled", "net_onnx", "net_exported"]
DIGITS = ["digits_int8", "digits_int8_static", "digits_fp16", "digits_bf16", "digits_pruned", "digits_pruned_structured",
          "digits_distilled", "digits_onnx", "digits_exported"]


def _on_gpu(folder: Path):  # noqa: ANN202
    handler, context = served(folder, 1, gpu=0)
    fmt = handler.engine.model_options.format
    if fmt in CPU_ONLY_FORMATS or fmt == "onnx":
        assert handler.engine.device == torch.device("cpu")
    else:
        assert handler.engine.device == torch.device("cuda:0"), handler.engine.loaded.describe()
    return handler, context


@pytest.mark.parametrize("name", NET)
def test_net_variants_answer_on_a_gpu_worker(name: str, variant_builds: dict[str, VariantBuild], net_spec: ModelSpec, tmp_path: Path) -> None:
    build = variant_builds[name]
    handler, context = _on_gpu(unpack(build.archive, tmp_path / name))
    rows = np.random.default_rng(5).normal(size=(64, 10)).astype(np.float32)
    [answer] = handled(handler, [{"body": {"inputs": rows.tolist()}}], context)
    assert context.get_response_status(0)[0] in (None, 200), answer
    gap = np.abs(np.array(answer["predictions"]) - reference_net(net_spec.weights, rows)).max()
    bound = build.spec.fidelity.max_abs_diff
    if bound is not None:
        assert gap <= bound, (name, gap)


@pytest.mark.parametrize("name", ["digits", *DIGITS])
def test_digits_variants_agree_with_the_cpu_on_a_gpu_worker(name: str, variant_builds: dict[str, VariantBuild], digits_spec: ModelSpec,
                                                            digits_dir: Path, tmp_path: Path) -> None:
    folder = digits_dir if name == "digits" else unpack(variant_builds[name].archive, tmp_path / name)
    handler, context = _on_gpu(folder)
    images = digits_split()["x_test"][:64]
    with torch.inference_mode():
        expected = digits_model(digits_spec.weights)(images).argmax(dim=1).numpy()
    got = []
    for ink in images:
        [answer] = handled(handler, [{"body": {"inputs": (ink[0] * 16).tolist(), "k": 1}}], context)
        got.append(answer["predictions"][0]["index"])
    assert (np.array(got) == expected).mean() >= 0.95, name


@pytest.mark.parametrize("name", ["digits_fp16", "digits_bf16"])
def test_half_precision_runs_in_its_dtype_on_the_gpu(name: str, variant_builds: dict[str, VariantBuild], tmp_path: Path) -> None:
    handler, _ = _on_gpu(unpack(variant_builds[name].archive, tmp_path / name))
    dtype = "float16" if name.endswith("fp16") else "bfloat16"
    assert handler.engine.loaded.engine == f"torch {dtype} on cuda:0"
    outputs = handler.engine.inference((torch.zeros((4, 1, 8, 8)),))
    assert outputs.dtype == torch.float32 and outputs.device.type == "cpu"


def test_explanations_on_a_gpu_worker(digits_dir: Path) -> None:
    from ts.context import RequestProcessor

    handler, context = _on_gpu(digits_dir)
    context.request_processor = [RequestProcessor({"explain": "True"})]
    [answer] = handled(handler, [{"body": {"inputs": [[0.0] * 8] * 8}}], context)
    assert np.array(answer["attributions"]).shape[-2:] == (8, 8)
