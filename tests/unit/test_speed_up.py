"""handler.fold_batchnorm and handler.channels_last on a user's CNN with BatchNorm, and a batch's images decoded side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from serveready.archiver import ArchiverError, build, load_spec
from serveready.handlers.config import ModelOptions
from serveready.handlers.errors import ModelLoadError
from serveready.handlers.loaders import Loaded, speed_up
from tests.conftest import handled, served, unpack
from tests.unit.test_standard_images import picture, torchvision_like

BN_CNN = '''"""A user's small CNN with batch normalisation (the shape of a ResNet stem)."""
import torch
from torch import nn


class BnCNN(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x).flatten(1))


class Branchy(BnCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return super().forward(x)
'''
HANDLER = {"entry": "image_classifier", "resize": [20], "crop": [16], "mean": [0.5], "std": [0.25], "top_k": 3, "torch_threads": 2}


def _project(base: Path, class_name: str, handler: dict) -> tuple[Path, nn.Module]:
    """The model with seeded weights and batch-norm statistics far from 0 and 1 (folding must carry them), and its config."""
    (base / "models").mkdir(parents=True, exist_ok=True)
    (base / "model_configs").mkdir(exist_ok=True)
    (base / "models" / "bncnn.py").write_text(BN_CNN)
    namespace: dict = {}
    exec(compile(BN_CNN, "bncnn.py", "exec"), namespace)  # noqa: S102  (the reference model, outside the archive)
    torch.manual_seed(3)
    model = namespace[class_name]().eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        nn.init.uniform_(bn.weight, 0.5, 2)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    with torch.no_grad():
        model.head.weight.mul_(10.0)
    torch.save(model.state_dict(), base / "bncnn.pt")
    config = {"name": "bncnn", "model": {"file": "models/bncnn.py", "class": class_name, "sample_shape": [2, 3, 16, 16]},
              "weights": "bncnn.pt", "handler": handler}
    (base / "model_configs" / "bncnn.yaml").write_text(yaml.safe_dump(config))
    return base / "model_configs" / "bncnn.yaml", model


def test_folded_channels_last_model_answers_what_the_model_computes(tmp_path: Path) -> None:
    config, model = _project(tmp_path / "user", "BnCNN", {**HANDLER, "fold_batchnorm": True, "channels_last": True})
    archive = build(load_spec(config), tmp_path / "store")
    handler_section = yaml.safe_load((unpack(archive, tmp_path / "peek") / "model-config.yaml").read_text())["handler"]
    assert handler_section["fold_batchnorm"] is True and handler_section["channels_last"] is True
    handler, context = served(unpack(archive, tmp_path / "unpacked"), 4)
    engine = handler.engine
    assert not any(isinstance(m, nn.BatchNorm2d) for m in engine.model.modules())  # folded into the convolutions
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in engine.model.parameters() if p.dim() == 4)
    assert "BatchNorm folded and channels-last" in engine.loaded.describe()
    assert engine._decoders is not None  # two torch threads: the batch's images are decoded side by side

    pictures = [picture((30, 24), "RGB", "PNG", 1), picture((25, 40), "RGB", "JPEG", 2), picture((20, 20), "L", "PNG", 3)]
    batch = [{"body": bytearray(p)} for p in pictures[:2]] + [{"body": bytearray(b"not an image")}, {"body": bytearray(pictures[2])}]
    answers = handled(handler, batch, context)
    assert context.get_response_status(2)[0] == 400 and "not a PNG or JPEG" in answers[2]["message"]  # alone
    with torch.inference_mode():
        expected = torch.softmax(model(torch.stack([torchvision_like(p, 20, 16, [0.5] * 3, [0.25] * 3) for p in pictures])), dim=1).numpy()
    assert expected.max(axis=1).min() < 0.99 and expected.std(axis=0).max() > 0.01  # answers that can tell the images apart
    for answer, row in zip([answers[0], answers[1], answers[3]], expected, strict=True):
        by_index = {p["index"]: p["probability"] for p in answer["predictions"]}
        np.testing.assert_allclose([by_index[i] for i in range(3)], row, rtol=1e-4, atol=1e-5)


def test_a_model_fx_cannot_trace_fails_the_build_naming_the_option(tmp_path: Path) -> None:
    config, _ = _project(tmp_path / "user", "Branchy", {**HANDLER, "fold_batchnorm": True})
    with pytest.raises(ArchiverError, match=r"handler\.fold_batchnorm: torch\.fx cannot trace Branchy .*set fold_batchnorm: false"):
        build(load_spec(config), tmp_path / "store")
    config, _ = _project(tmp_path / "user", "Branchy", {**HANDLER, "channels_last": True})  # needs no tracing
    assert build(load_spec(config), tmp_path / "store").is_file()


def test_only_eager_models_change_and_a_model_that_computes_otherwise_is_refused() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    sample = (torch.zeros(2, 3, 8, 8),)
    loaded = Loaded(conv, torch.device("cpu"), "torch int8 dynamic on cpu")
    assert speed_up(loaded, ModelOptions(format="int8_dynamic", sample_shape=(2, 3, 8, 8)), True, True, sample) is loaded
    eager = ModelOptions(sample_shape=(2, 3, 8, 8))
    assert speed_up(loaded, eager, False, False, sample) is loaded

    class Unstable(nn.Module):  # a model whose channels-last copy would compute something else
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.conv(x)
            return out.flatten(1) if self.conv.weight.is_contiguous() else out.flatten(1) + 1.0

    with pytest.raises(ModelLoadError, match=r"change the model's outputs by 1 .*set them to false"):
        speed_up(Loaded(Unstable().eval(), torch.device("cpu"), "torch float32 on cpu"), eager, False, True, sample)
