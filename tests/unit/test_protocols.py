"""KServe v1 and Open Inference Protocol v2 requests through both handlers, with TorchServe's own Context."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from ts.context import RequestProcessor

from serveready.archiver import ModelSpec
from tests.conftest import digits_model, digits_split, handled, reference_net, render_digit, served

ROWS = np.random.default_rng(3).normal(size=(3, 10)).astype(np.float32)


@pytest.fixture
def net(net_dir: Path):  # noqa: ANN201
    return served(net_dir, 2)


@pytest.fixture
def digits(digits_dir: Path):  # noqa: ANN201
    return served(digits_dir, 2)


def _status(context, idx: int) -> int:  # noqa: ANN001
    return context.get_response_status(idx)[0] or 200


def _v2(data, shape, datatype="FP32", name="x", **extra) -> dict:  # noqa: ANN001
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}], **extra}


def test_kserve_v1_rows_answer_like_our_json(net, net_spec: ModelSpec) -> None:  # noqa: ANN001
    handler, context = net
    v1, own = handled(handler, [{"body": {"instances": ROWS.tolist()}}, {"body": {"inputs": ROWS.tolist()}}], context)
    np.testing.assert_allclose(v1["predictions"], reference_net(net_spec.weights, ROWS), atol=1e-5)
    np.testing.assert_allclose(v1["predictions"], own["predictions"], rtol=1e-6)  # one batch: rows at other positions may round apart
    assert set(v1) == set(own) == {"predictions"}


def test_v2_rows_flat_or_nested_answer_in_the_protocols_shape(net, net_spec: ModelSpec) -> None:  # noqa: ANN001
    handler, context = net
    flat, nested = handled(handler, [{"body": _v2(ROWS.flatten().tolist(), [3, 10], id="req-7")}, {"body": _v2(ROWS.tolist(), [3, 10], "FP64")}], context)
    assert (flat["model_name"], flat["model_version"], flat["id"]) == ("net", "1.0", "req-7") and "id" not in nested
    [output] = flat["outputs"]
    assert (output["name"], output["shape"], output["datatype"]) == ("predictions", [3, 1], "FP32")
    np.testing.assert_allclose(np.array(output["data"]).reshape(3, 1), reference_net(net_spec.weights, ROWS), atol=1e-5)
    assert [{k: v for k, v in o.items() if k != "data"} for o in nested["outputs"]] == [{k: v for k, v in o.items() if k != "data"} for o in flat["outputs"]]
    np.testing.assert_allclose(nested["outputs"][0]["data"], flat["outputs"][0]["data"], rtol=1e-6)


@pytest.mark.parametrize(("body", "message"), [
    (_v2([0.0] * 12, [2, 6]), "v2: input 'x': expected numbers of shape [rows, 10] (or [10]), got [2, 6]"),
    (_v2([0.0] * 10, [2, 10]), "v2: input 'x' has 10 values, its shape says 20"),
    (_v2([True] * 10, [1, 10], "BOOL"), "v2: input 'x' has datatype \"BOOL\"; this model takes FP32"),
    (_v2(["a"] + [0.0] * 9, [1, 10]), "v2: input 'x' value 0 is \"a\", expected a number"),
    (_v2([1e39] + [0.0] * 9, [1, 10]), "v2: input 'x' holds values that are not finite FP32 numbers"),
    (_v2([1e300] + [0.0] * 9, [1, 10], "FP64"), "v2: input 'x' holds values that are not finite FP64 numbers (or beyond float32, which the model computes in)"),
    (_v2([70000.0] + [0.0] * 9, [1, 10], "FP16"), "v2: input 'x' holds values that are not finite FP16 numbers"),
    (_v2([2**70] + [0] * 9, [1, 10], "INT64"), "v2: input 'x' value 0 is 1180591620717411303424, not a whole number within INT64 (-9223372036854775808 to"),
    (_v2([0] * 9 + [256], [1, 10], "UINT8"), "v2: input 'x' value 9 is 256, not a whole number within UINT8 (0 to 255)"),
    (_v2([0.5] + [0] * 9, [1, 10], "INT32"), "v2: input 'x' value 0 is 0.5, not a whole number within INT32"),
    (_v2([0.0] * 10, [1, -10]), "v2: input 'x' needs a \"shape\" list of sizes >= 0"),
    (_v2([0.0], [10**9, 10**9]), "v2: input 'x' declares 1000000000000000000 values, more than the limit"),
    ({"inputs": [{"name": "a", "shape": [10], "datatype": "FP32", "data": [0] * 10}] * 2}, "v2: this model takes one input tensor, the request has 2"),
    ({"inputs": [{"shape": [10], "datatype": "FP32", "data": [0] * 10}]}, 'v2: input 0 needs a "name" string'),
])
def test_malformed_v2_gets_400_in_the_protocols_error_shape_and_alone(net, body: dict, message: str) -> None:  # noqa: ANN001
    handler, context = net
    bad, good = handled(handler, [{"body": body}, {"body": _v2([0.0] * 10, [10])}], context)
    assert _status(context, 0) == 400 and set(bad) == {"error"} and bad["error"].startswith(message), bad
    assert _status(context, 1) == 200 and good["outputs"][0]["shape"] == [1, 1]


def test_v2_json_numbers_of_every_datatype_reach_the_model_as_float32(net, net_spec: ModelSpec) -> None:  # noqa: ANN001
    handler, context = net
    whole = np.arange(-5, 5, dtype=np.float32).reshape(1, 10)
    for datatype in ("INT8", "INT16", "INT32", "INT64", "FP16", "FP64"):
        [answer] = handled(handler, [{"body": _v2(whole.astype(int).tolist() if datatype.startswith("INT") else whole.tolist(), [1, 10], datatype)}], context)
        np.testing.assert_allclose(answer["outputs"][0]["data"], reference_net(net_spec.weights, whole).flatten(), atol=1e-5)


def test_malformed_v1_gets_400_with_our_error_body(net) -> None:  # noqa: ANN001
    handler, context = net
    empty, short = handled(handler, [{"body": {"instances": []}}, {"body": {"instances": [[1, 2]]}}], context)
    assert _status(context, 0) == 400 and empty["message"] == 'KServe v1: "instances" must be a non-empty list, one entry per input'
    assert _status(context, 1) == 400 and short["message"] == "row 0 has 2 values, expected 10"


def _binary_request(header: dict, payload: bytes) -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    return text + payload, {"Inference-Header-Content-Length": str(len(text))}


def test_v2_binary_data_extension_as_tritonclient_sends_it(net, net_spec: ModelSpec) -> None:  # noqa: ANN001
    handler, context = net
    payload = ROWS.astype("<f4").tobytes()
    header = {"inputs": [{"name": "x", "shape": [3, 10], "datatype": "FP32", "parameters": {"binary_data_size": len(payload)}}]}
    body, headers = _binary_request(header, payload)
    short, _ = _binary_request(header, payload[:-4])
    context.request_processor = [RequestProcessor(headers), RequestProcessor({"Inference-Header-Content-Length": headers["Inference-Header-Content-Length"]})]
    good, bad = handled(handler, [{"body": body}, {"body": short}], context)
    np.testing.assert_allclose(np.array(good["outputs"][0]["data"]).reshape(3, 1), reference_net(net_spec.weights, ROWS), atol=1e-5)
    assert _status(context, 1) == 400 and "binary_data_size 120 of input 'x' does not fit the body" in bad["error"]


def _png(ink: np.ndarray) -> bytes:
    return render_digit(ink * 16, (40, 40))


def test_digits_v1_and_v2_images_agree_with_our_json(digits, digits_spec: ModelSpec) -> None:  # noqa: ANN001
    handler, context = digits
    split = digits_split()
    pngs = [_png(split["x_test"][i, 0].numpy()) for i in range(3)]
    encoded = [base64.b64encode(p).decode() for p in pngs]
    v1, v2 = handled(handler, [{"body": {"instances": [{"b64": encoded[0]}, encoded[1], (split["x_test"][2, 0] * 16).tolist()]}},
                               {"body": _v2(encoded, [3], "BYTES", name="image")}], context)
    own = [handled(handler, [{"body": p}, {"body": p}], context)[0]["predictions"] for p in pngs]
    for got, want in zip(v1["predictions"][:2], own[:2], strict=True):  # batched with others: equal up to rounding
        assert [p["index"] for p in got] == [p["index"] for p in want]
        np.testing.assert_allclose([p["probability"] for p in got], [p["probability"] for p in want], rtol=1e-4, atol=1e-7)
    probabilities = np.array(v2["outputs"][0]["data"]).reshape(3, 10)
    assert v2["outputs"][0]["name"] == "probabilities" and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert [row[0]["index"] for row in own] == probabilities.argmax(axis=1).tolist()
    with torch.inference_mode():
        expected = digits_model(digits_spec.weights)(split["x_test"][:3]).argmax(dim=1).tolist()
    numeric = handled(handler, [{"body": _v2((split["x_test"][:3, 0] * 16).tolist(), [3, 8, 8])}, {"body": {"inputs": [[0] * 8] * 8}}], context)[0]
    assert np.array(numeric["outputs"][0]["data"]).reshape(3, 10).argmax(axis=1).tolist() == expected


def test_digits_v2_binary_bytes_elements(digits) -> None:  # noqa: ANN001
    handler, context = digits
    png = _png(digits_split()["x_test"][0, 0].numpy())
    payload = struct.pack("<I", len(png)) + png
    body, headers = _binary_request({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(payload)}}]}, payload)
    context.request_processor = [RequestProcessor(headers), RequestProcessor({})]
    [answer, _] = handled(handler, [{"body": body}, {"body": png}], context)
    assert answer["outputs"][0]["shape"] == [1, 10], answer
    context.request_processor = [RequestProcessor({}), RequestProcessor({})]
    bad = handled(handler, [{"body": _v2(["not base64!"], [1], "BYTES")}, {"body": png}], context)[0]
    assert bad["error"].startswith("v2: input 'x': an instance is not valid base64"), bad
