"""The image handler's standard path: an ordinary classifier with torchvision's conventions, from a folder of its own."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from serveready.archiver import ArchiverError
from serveready.handlers.images import center_crop
from tests.conftest import RGB_HANDLER, ImageProject, answer_without_library, handled, image_project, served, unpack


def torchvision_like(data: bytes, resize: int, crop: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """Resize(resize) -> CenterCrop(crop) -> ToTensor -> Normalize(mean, std), written out with numpy."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    size = (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)
    pixels = np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    top, left = int(round((size[1] - crop) / 2)), int(round((size[0] - crop) / 2))
    pixels = (pixels[top : top + crop, left : left + crop] - np.array(mean)) / np.array(std)
    return torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32).copy())


def picture(size: tuple[int, int], mode: str, fmt: str, seed: int) -> bytes:
    """Random pixels of ``size`` in ``mode``, saved as ``fmt``."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(out, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


def _ready(project: ImageProject, tmp_path: Path, batch: int, headers: dict | None = None, explain: bool = False):  # noqa: ANN202
    from ts.context import RequestProcessor

    handler, context = served(unpack(project.archive, tmp_path / "unpacked"), batch)
    context.request_processor = [RequestProcessor({**(headers or {}), **({"explain": "True"} if explain else {})}) for _ in range(batch)]
    return handler, context


def _probabilities(answer: dict, classes: int) -> list[float]:
    by_index = {p["index"]: p["probability"] for p in answer["predictions"]}
    return [by_index[i] for i in range(classes)]


def test_images_in_every_form_match_torchvision_conventions(rgb_project: ImageProject, tmp_path: Path) -> None:
    pictures = [picture((64, 48), "RGB", "PNG", 1), picture((50, 70), "RGB", "JPEG", 2), picture((33, 33), "RGBA", "PNG", 3), picture((40, 90), "L", "PNG", 4)]
    batch = [{"body": bytearray(p)} for p in pictures] + [{"body": {"image": base64.b64encode(pictures[0]).decode(), "k": 4}}]
    handler, context = _ready(rgb_project, tmp_path, len(batch), {"X-Top-K": "4"})
    answers = handled(handler, batch, context)
    options = (RGB_HANDLER["resize"][0], RGB_HANDLER["crop"][0], RGB_HANDLER["mean"], RGB_HANDLER["std"])
    expected = torch.stack([torchvision_like(p, *options) for p in pictures + pictures[:1]])
    with torch.inference_mode():
        probabilities = torch.softmax(rgb_project.model(expected), dim=1).numpy()
    assert probabilities.max(axis=1).min() < 0.99 and probabilities.std(axis=0).max() > 0.01  # answers that can tell inputs apart
    for answer, row in zip(answers, probabilities, strict=True):
        np.testing.assert_allclose(_probabilities(answer, 4), row, rtol=1e-4, atol=1e-5)
        assert answer["predictions"][0]["class"] == ["cat", "dog", "bird", "fish"][int(row.argmax())]


def test_the_model_input_itself_and_top_k_default(rgb_project: ImageProject, tmp_path: Path) -> None:
    inputs = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(5))
    handler, context = _ready(rgb_project, tmp_path, 1)
    [answer] = handled(handler, [{"body": {"inputs": inputs.tolist()}}], context)
    with torch.inference_mode():
        expected = torch.softmax(rgb_project.model(inputs[None]), dim=1)[0]
    assert len(answer["predictions"]) == 2  # handler.top_k
    for p in answer["predictions"]:
        assert p["probability"] == pytest.approx(expected[p["index"]].item(), rel=1e-5)
        assert p["class"] == ["cat", "dog", "bird", "fish"][p["index"]]


BAD = [
    (json.dumps({"inputs": [[[0.0] * 32] * 32] * 2}), "'inputs' must be a list of 3 items (shape [3, 32, 32]), got 2 items"),
    (json.dumps({"inputs": [[[0.0] * 32] * 32] * 2 + [[[0.0] * 31] * 32]}), "'inputs'[2][0] must be a list of 32 items (shape [3, 32, 32]), got 31 items"),
    (json.dumps({"inputs": [[["x"] * 32] * 32] * 3}), "'inputs'[0][0][0] is \"x\" (a JSON string), expected a number"),
    (json.dumps({"pixels": []}), 'send a PNG/JPEG body, or JSON {"image": "<base64>"} or {"inputs": 3 x 32 x 32 numbers}'),
    (json.dumps({"inputs": [[[0.0] * 32] * 32] * 3, "k": 5}), "k must be a whole number from 1 to 4, got 5"),
    (base64.b64decode("R0lGODlhAQABAAAAACw="), "not a PNG or JPEG image"),
    # 100000x1 pixels in a few hundred bytes: resized to a shorter side of 40 it would be 4,000,000x40
    (picture((100_000, 1), "RGB", "PNG", 3), "image is 100000x1: resizing its shorter side to 40 would make it 4000000x40 = 160000000 pixels, "
                                              "more than the limit of 25000000; send a less elongated image"),
]


def test_bad_requests_fail_alone_with_400(rgb_project: ImageProject, tmp_path: Path) -> None:
    good = picture((64, 64), "RGB", "PNG", 9)
    batch = [{"body": bytearray(good)}] + [{"body": bytearray(body.encode() if isinstance(body, str) else body)} for body, _ in BAD]
    handler, context = _ready(rgb_project, tmp_path, len(batch))
    answers = handled(handler, batch, context)
    assert "predictions" in answers[0]
    for answer, (_, message) in zip(answers[1:], BAD, strict=True):
        assert answer["code"] == 400 and message in answer["message"], answer


def test_a_grey_classifier_resized_exactly(tmp_path: Path) -> None:
    grey = image_project(tmp_path, 1, {"resize": [28, 24]}, [2, 1, 28, 24], ("names.json", json.dumps(["a", "b", "c", "d"])))
    sent = picture((70, 50), "RGB", "PNG", 11)
    pixels = np.asarray(Image.open(io.BytesIO(sent)).convert("L").resize((24, 28), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    handler, context = _ready(grey, tmp_path, 2, {"X-Top-K": "4"})
    image, array = handled(handler, [{"body": bytearray(sent)}, {"body": {"inputs": pixels.tolist(), "k": 4}}], context)  # (h, w) for a grey model
    with torch.inference_mode():
        expected = torch.softmax(grey.model(torch.from_numpy(pixels)[None, None]), dim=1)[0].numpy()
    np.testing.assert_allclose(_probabilities(image, 4), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_probabilities(array, 4), expected, rtol=1e-4, atol=1e-5)
    assert {p["class"] for p in image["predictions"]} == {"a", "b", "c", "d"}


@pytest.mark.parametrize(
    ("handler", "classes", "message"),
    [
        ({"resize": [40]}, "a\nb\nc\nd", "handler.resize [40] keeps each image's aspect ratio: add crop: [32, 32]"),
        ({"resize": [40], "crop": [30]}, "a\nb\nc\nd", "handler.resize/crop make 30x30 images, but model.sample_shape [2, 3, 32, 32] takes 32x32"),
        ({"mean": [0.5, 0.5]}, "a\nb\nc\nd", "handler.mean needs 1 or 3 values for 3-channel inputs, got [0.5, 0.5]"),
        ({"preprocess": "digits"}, "a\nb\nc\nd", "handler.preprocess is not a known key"),  # 0.2's digits mode lives in examples/digits
        ({}, "a\nb\nc", "class names file classes.txt names 3 classes, the model has 4 outputs"),
    ],
)
def test_image_configs_that_cannot_work_fail_the_build(handler: dict, classes: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ArchiverError) as err:
        image_project(tmp_path, 3, handler, [2, 3, 32, 32], ("classes.txt", classes))
    assert message in err.value.message


def test_center_crop_pads_like_torchvision() -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    cropped = np.asarray(center_crop(Image.fromarray(pixels, "RGB"), 32, 32))
    # torchvision pads (left, top, right, bottom) = ((32-20)//2, (32-24)//2, (32-20+1)//2, (32-24+1)//2) with zeros
    np.testing.assert_array_equal(cropped, np.pad(pixels, ((4, 4), (6, 6), (0, 0))))
    odd = np.asarray(center_crop(Image.fromarray(pixels, "RGB"), 7, 9))
    np.testing.assert_array_equal(odd, pixels[int(round((24 - 7) / 2)) :][:7, int(round((20 - 9) / 2)) :][:, :9])


def test_explanations_are_per_channel_and_add_up(rgb_project: ImageProject, tmp_path: Path) -> None:
    inputs = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(8))
    handler, context = _ready(rgb_project, tmp_path, 1, explain=True)
    [answer] = handled(handler, [{"body": {"inputs": inputs.tolist()}}], context)
    attributions = np.array(answer["attributions"])
    assert attributions.shape == (3, 32, 32) and np.array(answer["input"]).shape == (3, 32, 32)
    target = answer["predictions"][0]["index"]
    with torch.inference_mode():
        gap = (rgb_project.model(inputs[None])[0, target] - rgb_project.model(torch.zeros(1, 3, 32, 32))[0, target]).item()
    assert attributions.sum() == pytest.approx(gap, rel=0.05, abs=0.05)


def test_served_without_this_library(rgb_project: ImageProject, tmp_path: Path) -> None:
    sent = picture((64, 48), "RGB", "PNG", 1)
    [answer] = answer_without_library(unpack(rgb_project.archive, tmp_path / "plain"), [sent])
    with torch.inference_mode():
        expected = torch.softmax(rgb_project.model(torchvision_like(sent, 40, 32, RGB_HANDLER["mean"], RGB_HANDLER["std"])[None]), dim=1)[0]
    assert [p["index"] for p in answer["predictions"]] == expected.topk(2).indices.tolist()


def test_init_writes_an_image_config_with_torchvision_style_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serveready.scripts.archive import main as ts_archive
    from tests.conftest import TINY_CNN

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.py").write_text(TINY_CNN)
    namespace: dict = {}
    exec(compile(TINY_CNN, "tiny.py", "exec"), namespace)  # noqa: S102
    torch.save(namespace["TinyCNN"]().state_dict(), tmp_path / "tiny.pt")
    (tmp_path / "names.txt").write_text("a\nb\nc\nd\n")
    monkeypatch.chdir(tmp_path)
    args = ["init", "tiny", "--model-file", "models/tiny.py", "--class", "TinyCNN", "--input", "image", "--sample-shape", "2", "3", "32", "32",
            "--weights", "tiny.pt", "--classes-file", "names.txt"]
    assert ts_archive(args) == 0
    config = tmp_path / "model_configs" / "tiny.yaml"
    text = config.read_text()
    for line in ("entry: image_classifier", "extra_files: [names.txt]", "classes_file: names.txt", "# resize: [37]", "# crop: [32, 32]", "# mean: [0.485, 0.456, 0.406]"):
        assert line in text, line
    config.write_text(text.replace("# resize: [37]", "resize: [37]").replace("# crop: [32, 32]", "crop: [32, 32]"))
    assert ts_archive(["build"]) == 0
    assert json.loads((tmp_path / "model_store" / "report.json").read_text())["archives"][0]["name"] == "tiny"
