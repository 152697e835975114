"""The wire formats, written once around every handler: its own JSON, KServe v1, the Open Inference Protocol v2.

TorchServe routes ``/v1/models/NAME:predict`` and ``/v2/models/NAME/infer`` to the same handler
as ``/predictions/NAME`` without saying which was called, so the body tells:

    {"instances": [...]}                                   KServe v1
    {"inputs": [{"name", "shape", "datatype", "data"}]}    Open Inference Protocol v2 (JSON)
    header Inference-Header-Content-Length: N              v2 with Triton's binary-data extension
    anything else                                          the handler's own format (JSON, an image...)

Each protocol is a :class:`Codec`: it turns a request into the handler's :class:`Decoded` rows
(the own format through ``handler.decode``, v1 instances and v2 tensors through
``handler.decode_instances``) and output rows into the protocol's answer, explanation or
error body. A handler never sees which protocol a request came in.

Only the standard library and torch: this module travels inside every archive.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from .base import OWN, BatchHandler, Decoded
from .errors import HandlerError, InvalidInput
from .payload import Request, decode_json

V1 = "kserve-v1"
V2 = "oip-v2"

#: v2 datatypes a request may carry numbers in, and the torch dtype of their binary form
NUMERIC = {
    "FP32": torch.float32, "FP64": torch.float64, "FP16": torch.float16,
    "INT64": torch.int64, "INT32": torch.int32, "INT16": torch.int16, "INT8": torch.int8, "UINT8": torch.uint8,
}
BYTES = "BYTES"
#: the whole numbers each integer datatype holds; JSON values outside them are refused, not wrapped
INTEGER_RANGE = {name: (torch.iinfo(dtype).min, torch.iinfo(dtype).max) for name, dtype in NUMERIC.items() if not dtype.is_floating_point}
BINARY_HEADER = "inference-header-content-length"
#: the most values one v2 tensor may declare (a bound before anything is allocated)
MAX_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Tensor:
    """One validated v2 input: numbers as a float32 tensor of ``shape``, or BYTES elements
    (``bytes`` from the binary extension, ``str`` from JSON)."""

    name: str
    shape: tuple[int, ...]
    datatype: str
    numbers: torch.Tensor | None = None
    items: tuple[bytes | str, ...] = ()


def announced(headers: Any) -> str:
    """The protocol a request's headers already say (v2's binary extension), before its body is read."""
    return V2 if headers.get(BINARY_HEADER) is not None else OWN


def sniff(request: Request) -> tuple[str, Any]:
    """(protocol, document): the request's JSON document when it has one (parsed once), else None.

    Raises:
        InvalidInput: the body cannot be read, or a v2 binary request is malformed.
    """
    body = request.body
    if isinstance(body, dict):  # TorchServe decoded application/json: no binary extension (and no header lookup)
        document = body
    elif (length := request.headers.get(BINARY_HEADER)) is not None:
        return V2, _binary_document(body, length)
    elif request.looks_like_json():
        document = request.json()
    else:
        return OWN, None
    if isinstance(document, dict):
        if "instances" in document:
            return V1, document
        inputs = document.get("inputs")
        if isinstance(inputs, list) and inputs and all(isinstance(i, dict) for i in inputs):
            return V2, document
    return OWN, document


def v1_instances(document: dict[str, Any], limit: int) -> list[Any]:
    instances = document["instances"]
    if not isinstance(instances, list) or not instances:
        raise InvalidInput('KServe v1: "instances" must be a non-empty list, one entry per input')
    if len(instances) > limit:
        raise InvalidInput(f'KServe v1: "instances" has {len(instances)} entries, more than the limit of {limit} per request')
    return instances


def v2_input(document: dict[str, Any]) -> Tensor:
    """The request's one input tensor, validated.

    Raises:
        InvalidInput: naming the field that is wrong.
    """
    inputs = document["inputs"]
    if len(inputs) != 1:
        raise InvalidInput(f'v2: this model takes one input tensor, the request has {len(inputs)} in "inputs"')
    spec = inputs[0]
    name = spec.get("name")
    shape = spec.get("shape")
    datatype = spec.get("datatype")
    if not isinstance(name, str):
        raise InvalidInput('v2: input 0 needs a "name" string')
    if not isinstance(shape, list) or not shape or not all(type(s) is int and s >= 0 for s in shape):
        raise InvalidInput(f'v2: input {name!r} needs a "shape" list of sizes >= 0, got {json.dumps(shape)[:40]}')
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise InvalidInput(f"v2: input {name!r} declares {count} values, more than the limit of {MAX_ELEMENTS}")
    if not isinstance(datatype, str) or (datatype not in NUMERIC and datatype != BYTES):
        raise InvalidInput(f'v2: input {name!r} has datatype {json.dumps(datatype)[:20]}; this model takes {", ".join([*NUMERIC, BYTES])}')
    binary = spec.get("_binary")
    binary = binary if isinstance(binary, bytes) else None  # set by _binary_document only: JSON has no bytes
    if datatype == BYTES:
        items = _bytes_items(binary) if binary is not None else _json_bytes(spec.get("data"), name)
        if len(items) != count:
            raise InvalidInput(f"v2: input {name!r} has {len(items)} BYTES elements, its shape {shape} says {count}")
        return Tensor(name, tuple(shape), datatype, items=tuple(items))
    if binary is not None:
        dtype = NUMERIC[datatype]
        size = torch.empty((), dtype=dtype).element_size()
        if len(binary) != count * size:
            raise InvalidInput(f"v2: input {name!r} has {len(binary)} bytes of binary data, its shape {shape} and {datatype} need {count * size}")
        numbers = torch.frombuffer(bytearray(binary), dtype=dtype).to(torch.float32) if count else torch.zeros(0)
    else:
        numbers = _json_numbers(spec.get("data"), name, count, datatype)
    if not bool(numbers.isfinite().all()):
        beyond = "" if datatype == "FP32" else " (or beyond float32, which the model computes in)"
        raise InvalidInput(f"v2: input {name!r} holds values that are not finite {datatype} numbers{beyond}")
    return Tensor(name, tuple(shape), datatype, numbers=numbers.reshape(shape))


def v2_output(name: str, values: torch.Tensor) -> dict[str, Any]:
    """One output tensor in the protocol's JSON form (row-major flat data)."""
    return {"name": name, "shape": list(values.shape), "datatype": "FP32", "data": values.float().flatten().tolist()}


def v2_response(model_name: str, version: str | None, request_id: Any, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    response: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": outputs}
    if request_id is not None:
        response["id"] = request_id
    return response


def v2_error(message: str) -> dict[str, str]:
    """The protocol's error body: clients such as tritonclient read ``error``."""
    return {"error": message}


def _binary_document(body: Any, length: str) -> dict[str, Any]:
    """Split Triton's binary-data extension: a JSON header of ``length`` bytes, then each input's bytes in order."""
    if not isinstance(body, (bytes, bytearray)):
        body = json.dumps(body).encode() if isinstance(body, (dict, list)) else str(body).encode()
    try:
        size = int(length)
    except ValueError:
        raise InvalidInput(f"v2: Inference-Header-Content-Length must be a byte count, got {length[:20]!r}") from None
    if not 0 < size <= len(body):
        raise InvalidInput(f"v2: Inference-Header-Content-Length {size} does not fit a {len(body)}-byte body")
    document = decode_json(bytes(body[:size]))
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list) or not document["inputs"]:
        raise InvalidInput('v2: the JSON header must be an object with an "inputs" list')
    rest, offset = bytes(body[size:]), 0
    for spec in document["inputs"]:
        if not isinstance(spec, dict):
            raise InvalidInput('v2: every entry of "inputs" must be an object')
        parameters = spec.get("parameters") or {}
        wanted = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if wanted is None:
            continue
        if type(wanted) is not int or wanted < 0 or offset + wanted > len(rest):
            raise InvalidInput(f"v2: binary_data_size {json.dumps(wanted)[:20]} of input {spec.get('name')!r} does not fit the body")
        spec["_binary"] = rest[offset:offset + wanted]
        offset += wanted
    if offset != len(rest):
        raise InvalidInput(f"v2: {len(rest) - offset} bytes after the inputs' binary data")
    return document


def _bytes_items(data: bytes) -> list[bytes]:
    """BYTES elements in binary form: each a 4-byte little-endian length, then that many bytes."""
    items, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise InvalidInput("v2: BYTES binary data ends inside an element's length")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + size > len(data):
            raise InvalidInput("v2: BYTES binary data ends inside an element")
        items.append(data[offset:offset + size])
        offset += size
    return items


def _json_bytes(data: Any, name: str) -> list[str]:
    """BYTES elements in JSON: strings, handed to the handler as they are (base64 image files, texts)."""
    flat = _flatten(data, name)
    for i, value in enumerate(flat):
        if not isinstance(value, str):
            raise InvalidInput(f"v2: input {name!r} element {i} must be a string")
    return flat


def _json_numbers(data: Any, name: str, count: int, datatype: str) -> torch.Tensor:
    """JSON values as float32, each first checked against its declared ``datatype``."""
    flat = _flatten(data, name)
    if len(flat) != count:
        raise InvalidInput(f"v2: input {name!r} has {len(flat)} values, its shape says {count}")
    if not {type(v) for v in flat} <= {int, float}:
        bad = next(i for i, v in enumerate(flat) if type(v) not in (int, float))
        raise InvalidInput(f"v2: input {name!r} value {bad} is {json.dumps(flat[bad])[:30]}, expected a number")
    if datatype in INTEGER_RANGE:
        low, high = INTEGER_RANGE[datatype]
        bad = next((i for i, v in enumerate(flat) if type(v) is not int or not low <= v <= high), None)
        if bad is not None:
            raise InvalidInput(f"v2: input {name!r} value {bad} is {json.dumps(flat[bad])[:30]}, not a whole number within {datatype} ({low} to {high})")
        return torch.tensor(flat, dtype=torch.float64).to(torch.float32)
    try:
        return torch.tensor(flat, dtype=NUMERIC[datatype]).to(torch.float32)  # FP16 beyond 65504 becomes inf: refused by the caller
    except (OverflowError, RuntimeError):
        raise InvalidInput(f"v2: input {name!r} holds a number beyond {datatype}") from None


def _flatten(data: Any, name: str) -> list[Any]:
    """Row-major values of ``data``, flat or nested (the protocol allows both)."""
    if not isinstance(data, list):
        raise InvalidInput(f'v2: input {name!r} needs "data" as a list (or binary data with binary_data_size)')
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                if len(stack) > 32:
                    raise InvalidInput(f"v2: input {name!r} data is nested too deeply")
                stack.append(iter(value))
                break
            flat.append(value)
            if len(flat) > MAX_ELEMENTS:
                raise InvalidInput(f"v2: input {name!r} has more than {MAX_ELEMENTS} values")
        else:
            stack.pop()
    return flat


# -- the codecs --------------------------------------------------------------------


def _merged(answer: Any, extra: dict[str, list[Any]], single: bool) -> Any:
    """An answer with an explanation's per-row values added: one value each for a single input, else lists."""
    if not isinstance(answer, dict):
        answer = {"predictions": answer}
    return {**answer, **{key: values[0] if single else values for key, values in extra.items()}}


class Codec:
    """One wire format: request -> Decoded, output rows -> answer, explanation or error body."""

    name: str = OWN

    def decode(self, handler: BatchHandler, request: Request, document: Any) -> Decoded:
        return handler.decode(request)

    def answer(self, handler: BatchHandler, item: Decoded, outputs: torch.Tensor, model: tuple[str, str | None]) -> Any:
        return handler.encode(item, outputs)

    def explanation(self, handler: BatchHandler, item: Decoded, outputs: torch.Tensor, attributions: torch.Tensor,
                    model: tuple[str, str | None]) -> Any:
        return _merged(handler.encode(item, outputs), handler.explain_rows(item, attributions), item.single)

    def error(self, err: HandlerError) -> dict[str, Any]:
        """The JSON body of a failed request: status, error type and the message."""
        return {"code": err.status, "type": type(err).__name__, "message": err.message}


class KServeV1(Codec):
    """``{"instances": [...]}`` -> ``{"predictions": [one per instance]}``."""

    name = V1

    def decode(self, handler: BatchHandler, request: Request, document: Any) -> Decoded:
        return handler.decode_instances(v1_instances(document, handler.max_instances), request)

    def answer(self, handler: BatchHandler, item: Decoded, outputs: torch.Tensor, model: tuple[str, str | None]) -> Any:
        return {"predictions": handler.encode_rows(outputs, item), **handler.answer_extras(item)}

    def explanation(self, handler: BatchHandler, item: Decoded, outputs: torch.Tensor, attributions: torch.Tensor,
                    model: tuple[str, str | None]) -> Any:
        return _merged(self.answer(handler, item, outputs, model), handler.explain_rows(item, attributions), False)


class OpenInference(Codec):
    """One input tensor -> the handler's ``tensor_outputs`` as v2 output tensors; errors as ``{"error": ...}``."""

    name = V2

    def decode(self, handler: BatchHandler, request: Request, document: Any) -> Decoded:
        tensor = v2_input(document)
        count = tensor.shape[0] if tensor.shape else 0
        limit = handler.max_instances
        if count == 0:
            raise InvalidInput(f"v2: input {tensor.name!r} holds no inputs (shape {list(tensor.shape)})")
        values: Any = tensor.numbers if tensor.numbers is not None else list(tensor.items)
        if tensor.numbers is None and len(tensor.shape) != 1:
            raise InvalidInput(f"v2: input {tensor.name!r} of BYTES must have shape [inputs], got {list(tensor.shape)}")
        # A 1-D tensor of numbers is one input without its batch dimension (a row): the handler bounds it.
        if (tensor.numbers is None or tensor.numbers.ndim > 1) and count > limit:
            raise InvalidInput(f"v2: input {tensor.name!r} holds {count} inputs, more than the limit of {limit} per request")
        try:
            item = handler.decode_instances(values, request)
        except InvalidInput as err:
            raise InvalidInput(err.message if err.message.startswith("v2:") else f"v2: input {tensor.name!r}: {err.message}") from None
        item.request_id = document.get("id")
        return item

    def answer(self, handler: BatchHandler, item: Decoded, outputs: torch.Tensor, model: tuple[str, str | None]) -> Any:
        outputs_v2 = [v2_output(name, values) for name, values in handler.tensor_outputs(outputs, item).items()]
        return v2_response(model[0], model[1], item.request_id, outputs_v2)

    def explanation(self, handler: BatchHandler, item: Decoded, outputs: torch.Tensor, attributions: torch.Tensor,
                    model: tuple[str, str | None]) -> Any:
        answer = self.answer(handler, item, outputs, model)
        answer["outputs"].append(v2_output("attributions", attributions))
        return answer

    def error(self, err: HandlerError) -> dict[str, Any]:
        return v2_error(err.message)


CODECS: dict[str, Codec] = {codec.name: codec for codec in (Codec(), KServeV1(), OpenInference())}
