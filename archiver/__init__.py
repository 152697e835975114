"""Model configs -> verified, measured TorchServe archives (``.mar``); installed as ``serveready.archiver``.

    spec       a model config, read and validated (typed sections)
    entries    which handler a config names, and what its archive carries
    datasets   the data sets training, variants and measurement share
    training   training recipes (``training: {recipe: ...}``)
    variants   the registry of variant kinds, and how each is derived
    evaluate   size, quality, fidelity and latency of a built archive
    build      verify -> pack -> load -> publish
    report     report.json and its Markdown table
    scaffold   ``ts-archive init``'s starter config
"""

from .build import build, build_all, build_measured, verify
from .errors import ArchiverError
from .spec import ModelSpec, load_spec, load_specs
from .training import TrainResult, train

__all__ = [
    "ArchiverError",
    "ModelSpec",
    "TrainResult",
    "build",
    "build_all",
    "build_measured",
    "load_spec",
    "load_specs",
    "train",
    "verify",
]
