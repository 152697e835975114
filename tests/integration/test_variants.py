"""Variants: each built from the fp32 weights, served by the shared handlers, within its bound."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from serveready.archiver import ArchiverError, ModelSpec, train
from serveready.archiver.build import build_measured
from serveready.archiver.spec import Fidelity
from tests.conftest import VariantBuild, digits_model, digits_split, handled, net_split, reference_net, served, unpack

EXPECTED = {
    "net": {"int8_dynamic", "float16", "bfloat16", "pruned", "pruned_structured", "distilled", "onnx", "exported"},
    "digits": {"int8_dynamic", "int8_static", "float16", "bfloat16", "pruned", "pruned_structured", "distilled", "onnx", "exported"},
}


def test_every_variant_of_both_models_builds(variant_builds: dict[str, VariantBuild]) -> None:
    for base, kinds in EXPECTED.items():
        assert {b.row["kind"] for b in variant_builds.values() if b.row["base"] == base} == kinds


def _served_net(build: VariantBuild, tmp_path: Path, rows: np.ndarray) -> np.ndarray:
    folder = unpack(build.archive, tmp_path / build.spec.name)
    handler, context = served(folder, 1)
    [answer] = handled(handler, [{"body": {"inputs": rows.tolist()}}], context)
    return np.array(answer["predictions"])


def test_net_variants_answer_within_their_bound_of_fp32(variant_builds: dict[str, VariantBuild], net_spec: ModelSpec, tmp_path: Path) -> None:
    rows = net_split()["x_test"][:64].numpy()
    fp32 = reference_net(net_spec.weights, rows)
    for build in (b for b in variant_builds.values() if b.row["base"] == "net"):
        answered = _served_net(build, tmp_path, rows)
        assert answered.shape == fp32.shape
        bound = build.spec.fidelity.max_abs_diff
        assert bound is not None and np.abs(answered - fp32).max() <= bound, build.spec.name


def test_digits_variants_answer_within_their_bound_of_fp32(variant_builds: dict[str, VariantBuild], digits_spec: ModelSpec, tmp_path: Path) -> None:
    images = digits_split()["x_test"][:32]
    with torch.inference_mode():
        fp32 = torch.softmax(digits_model(digits_spec.weights)(images), dim=1).numpy()
    batch = [{"body": {"inputs": (image[0] * 16).tolist(), "k": 10}} for image in images]
    for build in (b for b in variant_builds.values() if b.row["base"] == "digits"):
        folder = unpack(build.archive, tmp_path / build.spec.name)
        handler, context = served(folder, len(batch))
        answers = handled(handler, batch, context)
        answered = np.array([[{p["index"]: p["probability"] for p in a["predictions"]}[i] for i in range(10)] for a in answers])
        bound = build.spec.fidelity.max_abs_diff
        assert bound is not None and np.abs(answered - fp32).max() <= bound, build.spec.name


def test_digits_quantized_and_structured_archives_are_smaller(variant_builds: dict[str, VariantBuild], digits_archive: Path, digits_spec) -> None:  # noqa: ANN001
    # Weights against weights: every archive also carries the same copy of the library's handler code.
    fp32 = digits_spec.weights.stat().st_size
    for name in ("digits_int8", "digits_int8_static", "digits_pruned_structured", "digits_distilled"):
        assert variant_builds[name].row["weights_bytes"] < 0.7 * fp32, name
        assert variant_builds[name].archive.stat().st_size < digits_archive.stat().st_size, name
        assert variant_builds[name].row["archive_bytes"] == variant_builds[name].archive.stat().st_size
    assert variant_builds["digits_pruned_structured"].row["parameters"] == 21_546  # 64 -> 32 hidden units


def test_unstructured_pruning_is_half_zeros(variant_builds: dict[str, VariantBuild]) -> None:
    for name in ("net_pruned", "digits_pruned"):
        build = variant_builds[name]
        state = torch.load(build.spec.weights, weights_only=True)
        weights = [v for k, v in state.items() if k.endswith("weight")]
        zeros = sum(int((w == 0).sum()) for w in weights)
        assert zeros == sum(round(w.numel() * 0.5) for w in weights)  # exactly the configured 50% per layer
        total = sum(v.numel() for v in state.values())
        assert (build.row["parameters"], build.row["nonzero_parameters"]) == (total, total - zeros - sum(int((v == 0).sum()) for k, v in state.items() if not k.endswith("weight")))


def test_onnx_and_exported_archives_carry_no_python_model(variant_builds: dict[str, VariantBuild]) -> None:
    for name, weights in (("net_onnx", "net_onnx.onnx"), ("digits_exported", "digits_exported.pt2")):
        with zipfile.ZipFile(variant_builds[name].archive) as mar:
            manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
        assert "modelFile" not in manifest and manifest["serializedFile"] == weights


def test_int8_archive_holds_the_quantized_state_dict(variant_builds: dict[str, VariantBuild]) -> None:
    with zipfile.ZipFile(variant_builds["digits_int8"].archive) as mar:
        names = mar.namelist()
    assert "digits_int8.pt" in names
    state = torch.load(variant_builds["digits_int8"].spec.weights, weights_only=True)
    packed = state["classifier.1._packed_params._packed_params"]
    assert packed[0].dtype == torch.qint8  # int8 weights in the file, not fp32 re-quantized at load


def test_same_seed_same_student_and_same_report(variant_builds: dict[str, VariantBuild], tmp_path: Path) -> None:
    for name in ("digits_distilled", "net_pruned_structured"):
        build = variant_builds[name]
        again = dataclasses.replace(build.spec, weights=tmp_path / build.spec.weights.name)
        train(again)
        assert again.weights.read_bytes() == build.spec.weights.read_bytes()
        _, row = build_measured(again, tmp_path / "store")
        timing = ("latency_ms_1_row", "latency_ms_64_rows", "archive_bytes")
        assert {k: v for k, v in row.items() if k not in timing} == {k: v for k, v in build.row.items() if k not in timing}


def test_a_variant_missing_its_bound_is_refused(variant_builds: dict[str, VariantBuild], tmp_path: Path) -> None:
    build = variant_builds["net_int8"]
    strict = dataclasses.replace(build.spec, fidelity=Fidelity(max_abs_diff=1e-6))
    with pytest.raises(ArchiverError) as err:
        build_measured(strict, tmp_path)
    assert f"net_int8: misses its fidelity bound (net_int8.yaml): max_abs_diff {build.row['max_abs_diff']:.4g} exceeds 1e-06 by" in err.value.message
    assert not (tmp_path / "net_int8.mar").exists()


def test_quantized_models_refuse_explanations_with_501(variant_builds: dict[str, VariantBuild], tmp_path: Path) -> None:
    from ts.context import RequestProcessor

    folder = unpack(variant_builds["net_int8"].archive, tmp_path / "int8")
    handler, context = served(folder, 1)
    context.request_processor = [RequestProcessor({"explain": "True"})]
    [answer] = handled(handler, [{"body": {"inputs": [0.0] * 10}}], context)
    assert answer["code"] == 501 and "explanations need gradients" in answer["message"]


def test_int8_archives_on_a_gpu_worker_run_on_its_cpu_without_cuda(variant_builds: dict[str, VariantBuild], net_spec: ModelSpec,
                                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TorchServe gives a GPU worker gpu_id; torch.ao's int8 kernels cannot take CUDA tensors (every request
    answered 500 on an H100). The worker must stay on the CPU and never ask CUDA (no context)."""

    def no_cuda() -> bool:
        raise AssertionError("a CPU-only format asked CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    rows = np.random.default_rng(6).normal(size=(5, 10)).astype(np.float32)
    fp32 = reference_net(net_spec.weights, rows)
    for name in ("net_int8",):
        folder = unpack(variant_builds[name].archive, tmp_path / name)
        handler, context = served(folder, 1, gpu=0)
        assert handler.engine.device == torch.device("cpu")
        [answer] = handled(handler, [{"body": {"inputs": rows.tolist()}}], context)
        assert np.abs(np.array(answer["predictions"]) - fp32).max() <= variant_builds[name].spec.fidelity.max_abs_diff
    image = digits_split()["x_test"][0]
    for name in ("digits_int8", "digits_int8_static"):
        folder = unpack(variant_builds[name].archive, tmp_path / name)
        handler, context = served(folder, 1, gpu=0)
        assert handler.engine.device == torch.device("cpu"), name
        [answer] = handled(handler, [{"body": {"inputs": (image[0] * 16).tolist()}}], context)
        assert len(answer["predictions"]) == 3 and context.get_response_status(0)[0] in (None, 200), name


def test_a_gpu_worker_of_other_formats_asks_for_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from serveready.handlers.runtime import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device(1) == (torch.device("cuda:1"), "")
    assert select_device(None) == (torch.device("cpu"), "")
    device, note = select_device(1, "cpu")
    assert device == torch.device("cpu") and note == "GPU 1 left unused: this format's kernels run on the CPU only"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, note = select_device(1)  # a host whose torch has no CUDA: the CPU, and the log says so
    assert device == torch.device("cpu") and "has no CUDA" in note
    assert select_device(1, "onnxruntime") == (torch.device("cuda:1"), "")  # ONNX Runtime decides, torch is not asked


def _no_cuda_from_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch was asked for CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", refuse)
    monkeypatch.setattr(torch.cuda, "_lazy_init", refuse)


def test_onnx_on_a_gpu_worker_without_the_cuda_provider_runs_on_the_cpu_and_says_so(
        variant_builds: dict[str, VariantBuild], net_spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On an H100 the batch was moved to cuda:0 (a CUDA context) only to be copied back for ONNX Runtime's CPU provider."""
    import onnxruntime

    assert "CUDAExecutionProvider" not in onnxruntime.get_available_providers()
    _no_cuda_from_torch(monkeypatch)
    folder = unpack(variant_builds["net_onnx"].archive, tmp_path / "onnx")
    handler, context = served(folder, 1, gpu=0)
    assert handler.engine.device == torch.device("cpu") and handler.engine.loaded is not None
    assert handler.engine.loaded.describe() == (
        "onnxruntime CPUExecutionProvider on cpu, float32 (GPU 0 left unused: this host's onnxruntime has no CUDAExecutionProvider; "
        "pip install onnxruntime-gpu (in place of onnxruntime) for ONNX on the GPU)")
    rows = np.random.default_rng(7).normal(size=(4, 10)).astype(np.float32)
    [answer] = handled(handler, [{"body": {"inputs": rows.tolist()}}], context)
    np.testing.assert_allclose(answer["predictions"], reference_net(net_spec.weights, rows), atol=1e-5)


def test_onnx_runtime_falling_back_from_the_cuda_provider_is_said(variant_builds: dict[str, VariantBuild], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A host whose onnxruntime lists CUDAExecutionProvider but cannot start it (here: it has none at all): ONNX Runtime
    quietly uses the CPU; the worker's log must say so."""
    import onnxruntime

    from serveready.handlers.loaders import onnx_providers

    providers, note = onnx_providers(torch.device("cuda:1"), ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"] and note == ""
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real_session = onnxruntime.InferenceSession

    def cuda_fails_to_start(path: str, sess_options: object = None, providers: list | None = None) -> object:
        # onnxruntime-gpu without its CUDA libraries logs a warning and carries on with the rest of the list.
        assert providers is not None and providers[0][0] == "CUDAExecutionProvider"
        return real_session(path, sess_options=sess_options, providers=providers[1:])

    monkeypatch.setattr(onnxruntime, "InferenceSession", cuda_fails_to_start)
    _no_cuda_from_torch(monkeypatch)
    folder = unpack(variant_builds["digits_onnx"].archive, tmp_path / "onnx")
    handler, context = served(folder, 1, gpu=0)
    assert handler.engine.loaded is not None and handler.engine.loaded.engine == "onnxruntime CPUExecutionProvider on cpu, float32"
    assert "CUDAExecutionProvider did not start" in handler.engine.loaded.note


def test_a_model_that_cannot_run_where_it_was_put_fails_at_initialize(net_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not at its first request: the worker loads, runs a zero batch of sample_shape, and reports the reason."""
    from serveready.handlers import ModelLoadError, engine
    from serveready.handlers.loaders import Loaded

    def on_the_wrong_device(*args: object) -> Loaded:
        def run(batch: torch.Tensor) -> torch.Tensor:
            raise NotImplementedError("Could not run 'quantized::linear_dynamic' with arguments from the 'CUDA' backend")
        return Loaded(run, torch.device("cpu"), "torch int8 dynamic on cuda:0")

    monkeypatch.setattr(engine, "load_model", on_the_wrong_device)
    with pytest.raises(ModelLoadError, match="the eager model does not run with torch int8 dynamic on cuda:0: Could not run 'quantized::linear_dynamic'"):
        served(net_dir, 1)


def test_a_loader_failing_with_any_exception_is_a_load_error(variant_builds: dict[str, VariantBuild], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """torch without CUDA raises AssertionError on .to('cuda:0'): TorchServe would restart such a worker forever."""
    from serveready.handlers import ModelLoadError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    folder = unpack(variant_builds["net_exported"].archive, tmp_path / "exported")
    with pytest.raises(ModelLoadError, match="the exported model cannot be loaded on cuda:0: Torch not compiled with CUDA enabled"):
        served(folder, 1, gpu=0)
