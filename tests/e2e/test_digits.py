"""End to end: the digits model answers images, arrays and explanation requests over HTTP."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from serveready.handlers.images import open_image
from serveready.scripts import explain
from serveready.scripts.runinfo import RunDir, TokenKind
from tests.conftest import digits_model, digits_split, example_module, render_digit
from tests.e2e.conftest import Api
from tests.e2e.test_serve import ts_manage

SPLIT = digits_split()
INK = (SPLIT["x_test"][:, 0] * 16).numpy()
to_digit_grid = example_module("digits", "digits_handler").to_digit_grid


@pytest.fixture(scope="module")
def digits(server: RunDir) -> RunDir:
    done = ts_manage(server, "register", "digits.mar", "--workers", "1", "--batch-size", "8", "--max-batch-delay", "20")
    assert done.returncode == 0, done.stderr
    return server


@pytest.fixture(scope="module")
def model(digits_spec) -> torch.nn.Module:  # noqa: ANN001
    return digits_model(digits_spec.weights)


def _in_process(model: torch.nn.Module, grids: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(np.asarray(grids, np.float32)).reshape(-1, 1, 8, 8)), dim=1)


def _many(api: Api, payloads: list[tuple[bytes, str]]) -> list:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda p: api.predict("digits", p[0], content_type=p[1]), payloads))


@pytest.mark.parametrize(
    ("size", "fmt", "dark_on_light", "rgb"),
    [((28, 28), "PNG", True, False), ((64, 48), "PNG", False, True), ((100, 100), "JPEG", True, True), ((37, 37), "JPEG", False, False)],
)
def test_served_image_predictions_equal_in_process(digits: RunDir, api: Api, model, size, fmt, dark_on_light, rgb) -> None:  # noqa: ANN001
    pictures = [render_digit(INK[i], size, fmt, dark_on_light, rgb) for i in range(24)]
    replies = _many(api, [(p, f"image/{fmt.lower()}") for p in pictures])
    expected = _in_process(model, np.stack([to_digit_grid(open_image(p, 10**8)) for p in pictures]))
    for reply, probabilities in zip(replies, expected, strict=True):
        assert reply.status_code == 200, reply.text
        top = reply.json()["predictions"]
        assert len(top) == 3 and top[0]["index"] == int(probabilities.argmax())
        assert top[0]["probability"] == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_served_accuracy_over_the_heldout_split_matches_in_process(digits: RunDir, api: Api, model) -> None:  # noqa: ANN001
    arrays = _many(api, [(json.dumps({"inputs": ink.tolist(), "k": 1}).encode(), "application/json") for ink in INK])
    pictures = [render_digit(ink, (40, 40), "PNG") for ink in INK]
    images = _many(api, [(p, "image/png") for p in pictures])
    labels = SPLIT["y_test"].numpy()
    served_arrays = np.array([r.json()["predictions"][0]["index"] for r in arrays])
    served_images = np.array([r.json()["predictions"][0]["index"] for r in images])
    in_process_arrays = _in_process(model, INK / 16).argmax(dim=1).numpy()
    in_process_images = _in_process(model, np.stack([to_digit_grid(open_image(p, 10**8)) for p in pictures])).argmax(dim=1).numpy()
    assert (served_arrays == labels).mean() == (in_process_arrays == labels).mean() >= 0.97
    assert (served_images == labels).mean() == (in_process_images == labels).mean() >= 0.95


def test_bad_images_get_400_and_the_worker_keeps_serving(digits: RunDir, api: Api) -> None:
    good = render_digit(INK[0], (30, 30))
    for body, message in [
        (b"GIF89a not really", "request body is not a PNG or JPEG image"),
        (render_digit(np.random.default_rng(1).uniform(0, 16, (8, 8)), (64, 64))[:300], "image cannot be decoded"),
        (json.dumps({"inputs": [[0] * 8] * 3}).encode(), "'inputs' must be 8 rows of 8 numbers, got 3 row(s)"),
    ]:
        reply = api.predict("digits", body, content_type="image/png" if not body.startswith(b"{") else "application/json")
        assert reply.status_code == 400 and message in reply.json()["message"]
    assert api.predict("digits", good, content_type="image/png").status_code == 200


def test_top_k_from_a_request_header(digits: RunDir) -> None:
    headers = {"Authorization": f"Bearer {digits.token(TokenKind.INFERENCE)}", "Content-Type": "image/png", "X-Top-K": "5"}
    reply = requests.post(f"{digits.inference_url}/predictions/digits", data=render_digit(INK[1], (32, 32)), headers=headers, timeout=30)
    assert reply.status_code == 200 and len(reply.json()["predictions"]) == 5


def test_explanation_endpoint_and_heatmap_command(digits: RunDir, tmp_path: Path) -> None:
    picture = tmp_path / "digit.png"
    picture.write_bytes(render_digit(INK[4], (80, 80)))
    assert explain.main(["--run-dir", str(digits.path), str(picture), "--model", "digits"]) == 0
    result = explain.explain(digits, "digits", picture)
    assert np.array(result["attributions"]).shape == (8, 8) and np.array(result["input"]).shape == (8, 8)
    with Image.open(explain.heatmap_path(picture)) as heatmap:
        assert heatmap.format == "PNG" and heatmap.size == (900, 340)
