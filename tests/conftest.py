"""Shared pieces of every tier: the example models (trained here for integration and e2e; tests/unit
overrides them with seeded untrained weights), their real archives, and TorchServe Contexts on them.

Tiers by folder: tests/unit (in-process, nothing trained, no server), tests/integration (training,
variant builds, exports), tests/e2e (real servers on free loopback ports).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from ts.context import Context, RequestProcessor

from serveready.archiver import ModelSpec, build, load_spec, train
from serveready.archiver.datasets import DataFile
from serveready.handlers.host import handler_class_of
from serveready.handlers.runtime import build_module
from serveready.handlers.torchserve import TorchServeEntry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tag each test with its tier, from the folder it lives in."""
    for item in items:
        tier = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


def trained(name: str, tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    """The repo's config ``name``, trained by its example's hook into a private folder (weights and data file)."""
    spec = load_spec(ROOT / "model_configs" / f"{name}.yaml")
    folder = tmp_path_factory.mktemp("weights")
    data = DataFile(folder / "data" / spec.data_file.path.name, spec.data_file.task) if spec.data_file else None
    spec = dataclasses.replace(spec, weights=folder / spec.weights.name, data_file=data)
    train(spec)
    return spec


def untrained(name: str, tmp_path_factory: pytest.TempPathFactory, seed: int = 0, sharpen: float = 20.0) -> ModelSpec:
    """The repo's config ``name`` with seeded initial weights (the last layer's scaled by ``sharpen`` so
    classes differ) and no data file: what a parser, a codec or a handler test needs, in milliseconds."""
    spec = load_spec(ROOT / "model_configs" / f"{name}.yaml")
    torch.manual_seed(seed)
    model = build_module(spec.model_file, spec.model_class, spec.model_kwargs)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(sharpen)
    weights = tmp_path_factory.mktemp("weights") / spec.weights.name
    torch.save(model.state_dict(), weights)
    return dataclasses.replace(spec, weights=weights, data_file=None)


def unpack(archive: Path, target: Path) -> Path:
    """An archive unpacked, as TorchServe unpacks it for a worker."""
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(target)
    return target


def repack(archive: Path, target: Path, change: Callable[[dict[str, bytes]], None], resum: bool = True) -> Path:
    """A copy of ``archive`` with ``change`` applied to its entries (name -> bytes).

    ``resum``: give it fresh SHA256SUMS, as a builder of a bad archive would; without, it is
    a copy tampered with after the build.
    """
    from serveready.handlers.archive import normalize

    with zipfile.ZipFile(archive) as mar:
        entries = {info.filename: mar.read(info) for info in mar.infolist()}
    change(entries)
    with zipfile.ZipFile(target, "w") as out:
        for name, data in entries.items():
            out.writestr(name, data)
    if resum:
        normalize(target)
    return target


def model_fixtures(name: str, make: Callable[[str, pytest.TempPathFactory], ModelSpec]) -> tuple[Any, Any, Any]:
    """The session fixtures ``<name>_spec`` (``make(name, ...)``), ``<name>_archive`` (built) and ``<name>_dir`` (unpacked).

    A tier that makes its specs otherwise (tests/unit: untrained) declares all three again: pytest caches a
    session fixture once, whichever spec it was first built from.
    """

    @pytest.fixture(scope="session", name=f"{name}_spec")
    def spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
        return make(name, tmp_path_factory)

    @pytest.fixture(scope="session", name=f"{name}_archive")
    def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return build(request.getfixturevalue(f"{name}_spec"), tmp_path_factory.mktemp("store"))

    @pytest.fixture(scope="session", name=f"{name}_dir")
    def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return unpack(request.getfixturevalue(f"{name}_archive"), tmp_path_factory.mktemp("unpacked"))

    return spec, archive, folder


net_spec, net_archive, net_dir = model_fixtures("net", trained)


def served(model_dir: Path, batch: int = 1, gpu: int | None = None, handler_class: type | None = None) -> tuple[TorchServeEntry, Context]:
    """The archive's handler as a TorchServe worker runs it (its entry class, initialized with TorchServe's
    own Context), and that Context for ``batch`` requests."""
    context = make_context(model_dir, batch, gpu)
    cls = handler_class or handler_class_of(model_dir, context.model_yaml_config)
    entry = type(cls.__name__, (TorchServeEntry,), {"handler_class": cls})()
    entry.initialize(context)
    return entry, context


def answer_without_library(model_dir: Path, bodies: list[bytes]) -> list:
    """One batch through an unpacked archive, loaded as a TorchServe worker does, in a Python that has
    torch and ts but neither this library (``-S`` hides the editable install) nor numpy."""
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["numpy"] = None  # torch does not require numpy, so a TorchServe host may lack it
        sys.path.insert(0, {str(model_dir)!r})  # TorchServe puts the model dir first on the worker's PYTHONPATH
        from ts.model_loader import TsModelLoader
        service = TsModelLoader().load("m", {str(model_dir)!r}, "serveready_entry.py", None, {len(bodies)})
        import serveready.handlers
        assert serveready.handlers.__file__.startswith({str(model_dir)!r}), serveready.handlers.__file__
        from ts.context import RequestProcessor
        service.context.request_processor = [RequestProcessor({{}}) for _ in {bodies!r}]  # what Service.predict sets per batch
        out = service._entry_point([{{"body": b}} for b in {bodies!r}], service.context)
        print(json.dumps([json.loads(a) for a in out]))
        """
    )
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": os.environ["PATH"], "HOME": str(model_dir)}
    done = subprocess.run([sys.executable, "-S", "-W", "ignore", "-c", script], cwd=model_dir, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference_net(weights: Path, rows: np.ndarray) -> np.ndarray:
    """Net's forward computed independently, in float64 numpy from the state_dict."""
    state = {k: v.double().numpy() for k, v in torch.load(weights, weights_only=True).items()}
    hidden = rows.astype(np.float64) @ state["fc1.weight"].T + state["fc1.bias"]
    return hidden @ state["fc2.weight"].T + state["fc2.bias"]


def handled(handler: Any, batch: list[dict], context: Context) -> list:
    """One batch through TorchServe's entry point ``handle``, each JSON answer decoded (non-JSON answers as sent)."""
    answers = handler.handle(batch, context)
    assert len(answers) == len(batch)
    return [json.loads(a) if isinstance(a, bytes) and context.get_response_headers(i).get("content-type") == "application/json" else a
            for i, a in enumerate(answers)]


def make_context(model_dir: Path, batch: int, gpu: int | None = None) -> Context:
    """TorchServe's own Context for an unpacked archive, as its worker builds it."""
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
    context = Context(manifest["model"]["modelName"], str(model_dir), manifest, batch, gpu, "0.12.0", model_yaml_config=config)
    context.request_processor = [RequestProcessor({}) for _ in range(batch)]
    return context


digits_spec, digits_archive, digits_dir = model_fixtures("digits", trained)
sentiment_spec, sentiment_archive, sentiment_dir = model_fixtures("sentiment", trained)
spoken_digits_spec, spoken_digits_archive, spoken_digits_dir = model_fixtures("spoken_digits", trained)


def render_digit(
    ink: np.ndarray,
    size: tuple[int, int],
    fmt: str = "PNG",
    dark_on_light: bool = True,
    rgb: bool = False,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> bytes:
    """An 8x8 digit (ink 0..16) drawn as an image file of ``size``, as a person might send it."""
    pixels = (np.asarray(ink, dtype=np.float32) / 16.0 * 255).round().astype(np.uint8)
    if dark_on_light:
        pixels = 255 - pixels
    image = Image.fromarray(pixels, "L").resize(size, resample)
    if rgb:
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def digits_model(weights: Path) -> torch.nn.Module:
    """The digits CNN built in-process from the same weights, outside any handler code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_reference", EXAMPLES / "digits" / "models" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.DigitsCNN(channels=16, hidden=64)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


@dataclasses.dataclass(frozen=True)
class VariantBuild:
    spec: ModelSpec
    archive: Path
    row: dict


@pytest.fixture(scope="session")
def variant_builds(net_spec: ModelSpec, digits_spec: ModelSpec, sentiment_spec: ModelSpec, spoken_digits_spec: ModelSpec,
                   tmp_path_factory: pytest.TempPathFactory) -> dict[str, VariantBuild]:
    """Every variant config of the repo, derived from the session's trained models and built."""
    from serveready.archiver.build import build_measured

    bases = {"net": net_spec, "digits": digits_spec, "sentiment": sentiment_spec, "spoken_digits": spoken_digits_spec}
    folder = tmp_path_factory.mktemp("variants")
    store = folder / "store"
    builds = {}
    references: dict = {}
    for path in sorted((ROOT / "model_configs").glob("*.yaml")):
        spec = load_spec(path)
        if spec.base is None:
            continue
        spec = dataclasses.replace(spec, base=bases[spec.base.name], weights=folder / spec.weights.name)
        train(spec)
        archive, row = build_measured(spec, store, references)
        builds[spec.name] = VariantBuild(spec, archive, row)
    return builds


TINY_CNN = '''"""An ordinary small image classifier: convolution, pooling to 4x4, a linear head."""
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(8 * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))
'''


@dataclasses.dataclass(frozen=True)
class ImageProject:
    """A user's image classifier: its folder, spec, archive and the model computed here."""

    folder: Path
    spec: ModelSpec
    archive: Path
    model: torch.nn.Module


def image_project(base: Path, channels: int, handler: dict, sample: list[int], classes: tuple[str, str]) -> ImageProject:
    """TinyCNN with seeded random weights (sharpened so probabilities differ), packed from a folder of its own."""
    folder = base / "user"
    (folder / "models").mkdir(parents=True)
    (folder / "model_configs").mkdir()
    (folder / "models" / "tiny.py").write_text(TINY_CNN)
    (folder / classes[0]).write_text(classes[1])
    namespace: dict = {}
    exec(compile(TINY_CNN, "tiny.py", "exec"), namespace)  # noqa: S102  (the reference model, outside the archive)
    torch.manual_seed(7)
    model = namespace["TinyCNN"](channels=channels).eval()
    with torch.no_grad():
        model.head.weight.mul_(20.0)
    torch.save(model.state_dict(), folder / "tiny.pt")
    config = {
        "name": "tiny",
        "model": {"file": "models/tiny.py", "class": "TinyCNN", "kwargs": {"channels": channels}, "sample_shape": sample},
        "weights": "tiny.pt",
        "extra_files": [classes[0]],
        "handler": {"entry": "image_classifier", "classes_file": classes[0], **handler},
    }
    (folder / "model_configs" / "tiny.yaml").write_text(yaml.safe_dump(config))
    spec = load_spec(folder / "model_configs" / "tiny.yaml")
    return ImageProject(folder, spec, build(spec, folder / "model_store"), model)


#: An RGB classifier with torchvision's usual pipeline: Resize(40), CenterCrop(32), Normalize.
RGB_HANDLER = {"resize": [40], "crop": [32], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "top_k": 2}


@pytest.fixture(scope="session")
def rgb_project(tmp_path_factory: pytest.TempPathFactory) -> ImageProject:
    return image_project(tmp_path_factory.mktemp("rgb"), 3, RGB_HANDLER, [2, 3, 32, 32], ("classes.txt", "cat\ndog\n\nbird\nfish\n"))


def example_module(example: str, name: str) -> Any:
    """An example folder's module (``examples/<example>/<name>.py``), its neighbours importable as in its folder."""
    import importlib.util
    import sys

    key = f"example_{example}_{name.replace('/', '_')}"
    if key not in sys.modules:
        folder = str(EXAMPLES / example)
        if folder not in sys.path:
            sys.path.append(folder)
        spec = importlib.util.spec_from_file_location(key, EXAMPLES / example / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def net_split() -> dict[str, torch.Tensor]:
    """The generated regression task as the net example trains on it (net.yaml's training: seed 0, 2000 rows, 20% held out)."""
    return example_module("net", "train").make_regression(0, 2000, 10, 0.2, 0.1)


def sentiment_split() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """The Rotten Tomatoes reviews as the sentiment example splits them (seed 0, 20% held out): (train, held out)."""
    train = example_module("sentiment", "train")
    return train.split(train.load_reviews(train.corpus_path()), 0, 0.2)


def sentiment_model(weights: Path) -> torch.nn.Module:
    """The sentiment example's SentimentBag with ``weights``, computed here (outside any archive)."""
    model = example_module("sentiment", "models/sentiment").SentimentBag()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def sentiment_probabilities(spec: ModelSpec, texts: list[str]) -> torch.Tensor:
    """The sentiment model's class probabilities for ``texts``, computed here: its tokenizer file (truncated at the
    handler's 128 tokens, padded with [PAD]) and SentimentBag outside any archive."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(spec.extra_files[0]))
    tokenizer.enable_truncation(128)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(texts)
    with torch.inference_mode():
        logits = sentiment_model(spec.weights)(torch.tensor([e.ids for e in encodings]), torch.tensor([e.attention_mask for e in encodings]))
    return torch.softmax(logits, dim=1)


def spoken_digits_model(weights: Path) -> torch.nn.Module:
    """The spoken_digits example's SpokenDigitNet with ``weights``, computed here (outside any archive)."""
    model = example_module("spoken_digits", "models/spoken_digits").SpokenDigitNet()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def digits_split() -> dict[str, torch.Tensor]:
    """scikit-learn's digits split as the example trains on it (seed 0, 20% held out): ink / 16, (n, 1, 8, 8)."""
    return example_module("digits", "train").load_split(0, 0.2)
