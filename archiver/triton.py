"""An exit to NVIDIA Triton: the same model configs as a Triton model repository, no retraining.

    <out>/<name>/config.pbtxt       backend onnxruntime; inputs, outputs and dims from the ONNX graph;
                                    dynamic batching and instances from the config's serve: section
    <out>/<name>/1/model.onnx       the fp32 (or pruned, distilled) weights exported with a dynamic batch

``ts-archive triton NAME...`` (``make triton``) writes it; Triton serves it with
``tritonserver --model-repository <out>``.
"""

from __future__ import annotations

from pathlib import Path

from .build import verify
from .errors import ArchiverError
from .spec import ModelSpec
from .variants import onnx_bytes

#: ONNX TensorProto element types -> Triton's data types
TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 5: "TYPE_INT16", 6: "TYPE_INT32", 7: "TYPE_INT64",
                9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}
#: rows (images) one request may carry when the handler sets no max_rows, as the image handler's limit
DEFAULT_MAX_ROWS = 64


def export(spec: ModelSpec, out: Path) -> Path:
    """Write ``out/<name>/`` for ``spec``; returns that folder.

    Raises:
        ArchiverError: the spec's format is not an eager torch model (int8, half, onnx, exported
            variants: export their fp32 base), or the weights do not load.
    """
    if spec.kind_info.format != "eager":
        raise ArchiverError(f"{spec.name}: a Triton export starts from eager torch weights; {spec.kind_info.format} variants cannot: "
                            f"export {spec.base.name if spec.base else 'the fp32 model'} instead")
    model = verify(spec)
    data = onnx_bytes(spec.name, model, spec.sample_inputs, spec.dynamic_dims)
    folder = Path(out) / spec.name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "1" / "model.onnx").write_bytes(data)
    (folder / "config.pbtxt").write_text(config_pbtxt(spec, data))
    return folder


def config_pbtxt(spec: ModelSpec, model_onnx: bytes) -> str:
    """Triton's model configuration (protobuf text format) for an ONNX graph and the spec's serving settings."""
    import onnx

    graph = onnx.load_from_string(model_onnx).graph
    serve = spec.serve
    batch = serve.batchSize or 1
    workers = serve.maxWorkers or serve.minWorkers or 1
    kind = "KIND_GPU" if serve.deviceType.value == "gpu" else "KIND_CPU"
    # Triton's max_batch_size bounds the rows of one request too: the handler's max_rows, as on TorchServe.
    rows = int(getattr(spec.handler_options, "max_rows", DEFAULT_MAX_ROWS))
    lines = [
        f"# written by ts-archive triton from {spec.source.name}: TorchServe's batchSize {batch}, maxBatchDelay {serve.maxBatchDelay or 0} ms, "
        f"{workers} worker(s), handler max_rows {rows}",
        f'name: "{spec.name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max(batch, rows)}",
        *_tensors("input", graph.input),
        *_tensors("output", graph.output),
    ]
    if batch > 1:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {(serve.maxBatchDelay or 0) * 1000}", "}"]
    lines += ["instance_group [", "  {", f"    count: {workers}", f"    kind: {kind}", "  }", "]"]
    return "\n".join(lines) + "\n"


def _tensors(section: str, values) -> list[str]:  # noqa: ANN001 -- onnx's repeated ValueInfoProto
    lines = [f"{section} ["]
    for i, value in enumerate(values):
        tensor = value.type.tensor_type
        if tensor.elem_type not in TRITON_TYPES:
            raise ArchiverError(f"ONNX {section} {value.name!r} has element type {tensor.elem_type}, which Triton cannot take")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim][1:]  # the batch dimension is Triton's
        comma = "," if i < len(values) - 1 else ""
        lines += ["  {", f'    name: "{value.name}"', f"    data_type: {TRITON_TYPES[tensor.elem_type]}", f"    dims: [ {', '.join(map(str, dims))} ]", f"  }}{comma}"]
    return [*lines, "]"]
