"""The digits example trained (examples/digits/train.py) and served by its handler: the accuracy it promises."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from serveready.archiver.training import metrics_path
from tests.conftest import digits_model, digits_split, handled, render_digit, served

SPLIT = digits_split()


def _ink(i: int) -> np.ndarray:
    return (SPLIT["x_test"][i, 0] * 16).numpy()


def _ready(digits_dir: Path, batch: int):  # noqa: ANN202
    return served(digits_dir, batch)


def test_training_reaches_97_percent(digits_spec) -> None:  # noqa: ANN001
    with torch.inference_mode():
        predicted = digits_model(digits_spec.weights)(SPLIT["x_test"]).argmax(dim=1)
    accuracy = (predicted == SPLIT["y_test"]).float().mean().item()
    assert accuracy >= 0.97
    assert json.loads(metrics_path(digits_spec.weights).read_text())["heldout_accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize(
    ("size", "fmt", "dark_on_light", "rgb"),
    [((8, 8), "PNG", False, False), ((64, 64), "PNG", True, False), ((120, 120), "JPEG", True, True), ((48, 48), "JPEG", False, True)],
)
def test_images_in_every_form_give_the_digit(digits_dir: Path, size, fmt, dark_on_light, rgb) -> None:  # noqa: ANN001
    handler, context = _ready(digits_dir, 3)
    picture = render_digit(_ink(5), size, fmt, dark_on_light, rgb)
    batch = [
        {"body": bytearray(picture)},
        {"body": {"image": base64.b64encode(picture).decode()}},
        {"body": json.dumps({"image": "data:image/png;base64," + base64.b64encode(picture).decode(), "k": 1}).encode()},
    ]
    answers = handled(handler, batch, context)
    assert [a["predictions"][0]["index"] for a in answers] == [int(SPLIT["y_test"][5])] * 3
    assert [len(a["predictions"]) for a in answers] == [3, 3, 1]


