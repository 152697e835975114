"""The digits example's handler (examples/digits/digits_handler.py, a subclass of the library's image
classifier) as a TorchServe worker runs it, on a real digits archive; the accuracy of the trained model
is tests/integration/test_digits_example.py's."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from serveready.handlers.images import open_image
from tests.conftest import digits_model, digits_split, example_module, handled, render_digit, served

SPLIT = digits_split()
to_digit_grid = example_module("digits", "digits_handler").to_digit_grid


def _ready(digits_dir: Path, batch: int, explain: bool = False):  # noqa: ANN202
    from ts.context import RequestProcessor

    handler, context = served(digits_dir, batch)
    if explain:
        context.request_processor = [RequestProcessor({"explain": "True"}) for _ in range(batch)]
    return handler, context


def _ink(i: int) -> np.ndarray:
    return (SPLIT["x_test"][i, 0] * 16).numpy()


def _expected(i: int, weights: Path) -> int:
    with torch.inference_mode():
        return int(digits_model(weights)(SPLIT["x_test"][i:i + 1]).argmax())


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` and whose data is one empty chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_array_input_matches_in_process_model(digits_dir: Path, digits_spec) -> None:  # noqa: ANN001
    handler, context = _ready(digits_dir, 1)
    [answer] = handled(handler, [{"body": {"inputs": _ink(0).tolist(), "k": 10}}], context)
    with torch.inference_mode():
        expected = torch.softmax(digits_model(digits_spec.weights)(SPLIT["x_test"][:1]), dim=1)[0]
    got = {p["index"]: p["probability"] for p in answer["predictions"]}
    np.testing.assert_allclose([got[i] for i in range(10)], expected.numpy(), rtol=1e-4, atol=1e-6)
    probabilities = [p["probability"] for p in answer["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert [p["class"] for p in answer["predictions"]] == [str(p["index"]) for p in answer["predictions"]]
    [flat] = handled(handler, [{"body": {"inputs": _ink(0).flatten().tolist(), "k": 10}}], context)  # a row of digits.data
    assert flat == answer


def test_image_path_recovers_the_training_grid() -> None:
    """A digit blown up 8x (sharp pixels) and sent as a PNG comes back as the same 8x8 input."""
    from PIL import Image

    checked = 0
    for i in range(20):
        ink = _ink(i)
        grid = to_digit_grid(open_image(render_digit(ink, (64, 64), resample=Image.Resampling.NEAREST), 10**6))
        strong = ink > 0.1 * ink.max()  # what the converter counts as ink when cropping
        cols, rows = np.flatnonzero(strong.any(0)), np.flatnonzero(strong.any(1))
        faint = np.flatnonzero((ink > 0).any(0))
        if cols[0] != 7 - cols[-1] or (rows[0], rows[-1]) != (0, 7) or (faint[0], faint[-1]) != (cols[0], cols[-1]):
            continue  # off-centre or short digits are re-centred and re-scaled, as the training bitmaps were
        np.testing.assert_allclose(grid, ink / 16, atol=1 / 255 + 1e-6)
        checked += 1
    assert checked >= 5


def test_k_from_a_request_header(digits_dir: Path) -> None:
    from ts.context import RequestProcessor

    handler, context = _ready(digits_dir, 1)
    context.request_processor = [RequestProcessor({"X-Top-K": "5"})]
    [answer] = handled(handler, [{"body": bytearray(render_digit(_ink(1), (32, 32)))}], context)
    assert len(answer["predictions"]) == 5


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD = [
    (b"\x00\x01 definitely not an image", "request body is not a PNG or JPEG image"),
    (_half(render_digit(np.random.default_rng(0).uniform(0, 16, (8, 8)), (64, 64))), "image cannot be decoded (truncated or corrupt PNG)"),
    (_png(0, 10), "image is 0x10: it has no pixels"),
    (_png(30_000, 1_000), "image is 30000x1000 = 30000000 pixels, more than the limit of 25000000"),
    (_png(100_000, 100_000), "image has more pixels than the limit of 25000000"),
    (render_digit(np.zeros((8, 8)), (20, 20)), "image shows no digit"),
    (json.dumps({"inputs": [[0] * 8] * 7}).encode(), "'inputs' must be 8 rows of 8 numbers, got 7 row(s)"),
    (json.dumps({"inputs": [[0] * 8] * 9}).encode(), "'inputs' must be 8 rows of 8 numbers, got 9 row(s)"),
    (json.dumps({"inputs": [[0] * 7] * 8}).encode(), "row 0 has 7 values, expected 8"),
    (json.dumps({"inputs": [0] * 63}).encode(), "row 0 has 63 values, expected 8"),
    (json.dumps({"inputs": [[17] * 8] * 8}).encode(), "'inputs' values must be ink counts from 0 to 16, got 17 to 17"),
    (json.dumps({"image": "***"}).encode(), "'image' is not valid base64"),
    (json.dumps({"image": base64.b64encode(b"GIF89a").decode()}).encode(), "not a PNG or JPEG image"),
    (json.dumps({"inputs": [[0] * 8] * 8, "k": 11}).encode(), "k must be a whole number from 1 to 10, got 11"),
    (json.dumps({"inputs": [[0] * 8] * 8, "k": "three"}).encode(), "k must be a whole number from 1 to 10, got 'three'"),
    (json.dumps({"pixels": []}).encode(), 'send a PNG/JPEG body, or JSON {"image"'),
]


def test_bad_inputs_fail_alone_with_400(digits_dir: Path, digits_spec) -> None:  # noqa: ANN001
    good = render_digit(_ink(2), (40, 40))
    batch = [{"body": bytearray(good)}] + [{"body": bytearray(body)} for body, _ in BAD]
    handler, context = _ready(digits_dir, len(batch))
    answers = handled(handler, batch, context)
    assert len(answers) == len(batch)
    assert context.get_response_status(0)[0] in (None, 200) and len(answers[0]["predictions"]) == 3
    for idx, (_, message) in enumerate(BAD, start=1):
        assert answers[idx]["code"] == 400 and message in answers[idx]["message"], answers[idx]
        assert context.get_response_status(idx)[0] == 400


def test_explanation_attributions_add_up_to_the_logit(digits_dir: Path, digits_spec) -> None:  # noqa: ANN001
    """Integrated Gradients' completeness: attributions sum to f(x) - f(baseline) for the target class."""
    handler, context = _ready(digits_dir, 1, explain=True)
    [answer] = handled(handler, [{"body": {"inputs": _ink(3).tolist()}}], context)
    attributions = np.array(answer["attributions"])
    assert attributions.shape == (8, 8) and np.array(answer["input"]).shape == (8, 8)
    target = answer["predictions"][0]["index"]
    model = digits_model(digits_spec.weights)
    with torch.inference_mode():
        gap = (model(SPLIT["x_test"][3:4])[0, target] - model(torch.zeros(1, 1, 8, 8))[0, target]).item()
    assert attributions.sum() == pytest.approx(gap, rel=0.05, abs=0.05)


def test_kserve_explanations_of_several_images_answer_each(digits_dir: Path) -> None:
    """KServe v1 :explain with several instances: per image its top k, input and attributions, each as alone."""
    handler, context = _ready(digits_dir, 1, explain=True)
    grids = [_ink(i).tolist() for i in range(3)]
    [many] = handled(handler, [{"body": {"instances": grids}}], context)
    assert np.array(many["input"]).shape == np.array(many["attributions"]).shape == (3, 8, 8) and len(many["predictions"]) == 3
    for i, grid in enumerate(grids):
        [alone] = handled(handler, [{"body": {"inputs": grid}}], context)
        assert [p["index"] for p in many["predictions"][i]] == [p["index"] for p in alone["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in many["predictions"][i]], [p["probability"] for p in alone["predictions"]], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(many["attributions"][i], alone["attributions"], rtol=1e-4, atol=1e-5)
