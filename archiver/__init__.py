"""Build TorchServe model archives (``.mar``) from the YAML specs in ``model_configs/``."""

from archiver.build import build, build_all, verify
from archiver.errors import ArchiverError
from archiver.spec import DeviceType, ModelSpec, load_spec, load_specs
from archiver.training import TrainResult, train

__all__ = [
    "ArchiverError",
    "DeviceType",
    "ModelSpec",
    "TrainResult",
    "build",
    "build_all",
    "load_spec",
    "load_specs",
    "train",
    "verify",
]
