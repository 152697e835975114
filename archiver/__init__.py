"""Model configs -> verified, measured TorchServe archives (``.mar``); installed as ``serveready.archiver``.

    spec       a model config, read and validated (typed sections)
    entries    what a config names in the user's folder (handler, training hook), and what the archive carries
    datasets   the data file a config names (held-out and training rows), loaded once
    training   ``training: {recipe: train.py:fit}``: the user's hook, and the job it is handed
    variants   the registry of variant kinds, and how each is derived
    evaluate   size, quality, fidelity and latency of a built archive
    build      verify -> pack -> load -> measure -> publish
    report     report.json and its Markdown table
    scaffold   ``ts-archive init``'s starter config
    tune       the settings ``ts-archive tune`` tries, and the pick
    kserve, triton   exports for other servers

The command line (``ts-archive``) is ``serveready.scripts.archive``. Names below load their
modules when first used (torch and the model archiver with them).
"""

from __future__ import annotations

import importlib
from typing import Any

from serveready.handlers.errors import ArchiverError

_LAZY = {
    "ModelSpec": "spec", "load_spec": "spec", "load_specs": "spec",
    "build": "build", "build_all": "build", "build_measured": "build", "verify": "build",
    "TrainResult": "training", "TrainingJob": "training", "train": "training",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["ArchiverError", "ModelSpec", "TrainResult", "TrainingJob", "build", "build_all", "build_measured", "load_spec", "load_specs",
           "train", "verify"]
