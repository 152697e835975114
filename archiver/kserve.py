"""KServe: a storage tree and an InferenceService manifest per model, for KServe's TorchServe runtime.

    <out>/<name>/config/config.properties    TorchServe's configuration as the runtime reads it
    <out>/<name>/model-store/<name>.mar      the archive (and its .sig, if signed)
    <out>/<name>/inferenceservice.yaml       kubectl apply -f it, after copying the tree to its storageUri

The runtime starts ``torchserve --ts-config /mnt/models/config/config.properties`` with the tree
mounted at /mnt/models; KServe's model server in front of it answers on 8080 and forwards to
TorchServe on 8085. Inside the pod TorchServe listens on all interfaces with token
authorization off (KServe's model server holds no key; the pod is reached through KServe's
ingress only) and its model API off (the snapshot loads the model at start).

KServe is removing that runtime. With ``runtime="serveready"`` the same tree (without config/) is
served by this library's runtime instead: KServe's own Python model server, ``python -m
serveready.kserve --model_dir /mnt/models/model-store`` (docs/hosts.md); ``<out>/serveready-runtime.yaml``
is its ClusterServingRuntime and ``<out>/Dockerfile`` its image.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from serveready.handlers.archive import DEFAULT_JOB_QUEUE_SIZE, Archive

from .errors import ArchiverError
from .spec import ModelSpec

MOUNT = "/mnt/models"
PROTOCOLS = ("v1", "v2")
#: the runtimes the manifests can name: KServe's TorchServe runtime, or this library's (python -m serveready.kserve)
RUNTIMES = ("torchserve", "serveready")
#: the serveready runtime: its ClusterServingRuntime's name and model format, and the image of Dockerfile.serveready
RUNTIME_NAME = "serveready"
MODEL_FORMAT = "serveready-mar"
DEFAULT_IMAGE = "serveready-kserve:0.3.0"


@dataclass(frozen=True)
class Deployment:
    """How the InferenceService runs: protocol, where the tree lives, resources and replicas."""

    protocol: str = "v1"
    storage_uri: str = "pvc://models"
    gpu: bool = False
    cpu: str = "1"
    memory: str = "2Gi"
    min_replicas: int = 1
    max_replicas: int = 1
    canary_percent: int | None = None
    namespace: str | None = None
    runtime: str = "torchserve"
    image: str = DEFAULT_IMAGE

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ArchiverError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.protocol not in PROTOCOLS:
            raise ArchiverError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ArchiverError(f"replicas: 0 <= min ({self.min_replicas}) <= max ({self.max_replicas}), max >= 1")
        if self.canary_percent is not None and not 0 <= self.canary_percent <= 100:
            raise ArchiverError(f"canary percent must be 0..100, got {self.canary_percent}")


def model_snapshot(spec: ModelSpec, archive_name: str) -> dict[str, Any]:
    """TorchServe's model_snapshot entry: the model loads at start with the config's serve: settings.

    Unlike an archive's model-config.yaml, a snapshot's ``maxBatchDelay: 0`` is passed as given.
    """
    serve = spec.serve
    workers = serve.minWorkers or 1
    entry = {
        "defaultVersion": True,
        "marName": archive_name,
        "minWorkers": workers,
        "maxWorkers": serve.maxWorkers or workers,
        "batchSize": serve.batchSize or 1,
        "maxBatchDelay": serve.maxBatchDelay if serve.maxBatchDelay is not None else 0,
        "responseTimeout": serve.responseTimeout or 120,
    }
    return {"name": "startup.cfg", "modelCount": 1, "models": {spec.name: {spec.version: entry}}}


def config_properties(spec: ModelSpec, archive_name: str) -> str:
    """The ``config/config.properties`` KServe's TorchServe runtime reads."""
    lines = {
        # KServe's model server forwards to 8085; metrics for Prometheus on 8082.
        "inference_address": "http://0.0.0.0:8085",
        "management_address": "http://0.0.0.0:8085",
        "metrics_address": "http://0.0.0.0:8082",
        "grpc_inference_port": "7070",
        "grpc_management_port": "7071",
        "enable_metrics_api": "true",
        "metrics_mode": "prometheus",
        "model_metrics_auto_detect": "true",
        "ts_open_inference_protocol": "true",
        # The runtime sets its ports and envelope through TS_* variables.
        "enable_envvars_config": "true",
        "disable_token_authorization": "true",
        "enable_model_api": "false",
        "install_py_dep_per_model": "false",
        "number_of_netty_threads": "4",
        "job_queue_size": str(DEFAULT_JOB_QUEUE_SIZE),  # each archive says its own jobQueueSize too
        "max_request_size": str(8 * 2**20),
        "max_response_size": str(8 * 2**20),
        "model_store": f"{MOUNT}/model-store",
        "model_snapshot": json.dumps(model_snapshot(spec, archive_name), separators=(",", ":")),
    }
    header = f"# written by ts-archive kserve from {spec.source.name} for KServe's TorchServe runtime (storage mounted at {MOUNT})\n"
    return header + "".join(f"{k}={v}\n" for k, v in lines.items())


def inference_service(spec: ModelSpec, deployment: Deployment) -> dict[str, Any]:
    """The InferenceService manifest (serving.kserve.io/v1beta1)."""
    d = deployment
    requests = {"cpu": d.cpu, "memory": d.memory}
    limits = dict(requests)
    if d.gpu:
        limits["nvidia.com/gpu"] = "1"
        requests["nvidia.com/gpu"] = "1"
    predictor: dict[str, Any] = {"minReplicas": d.min_replicas, "maxReplicas": d.max_replicas}
    if d.canary_percent is not None:
        predictor["canaryTrafficPercent"] = d.canary_percent
    if d.runtime == RUNTIME_NAME:
        predictor["model"] = {
            "modelFormat": {"name": MODEL_FORMAT},
            "runtime": RUNTIME_NAME,
            "protocolVersion": d.protocol,
            "storageUri": f"{d.storage_uri.rstrip('/')}/{spec.name}",
            "resources": {"requests": requests, "limits": limits},
        }
    else:
        predictor["model"] = {
            "modelFormat": {"name": "pytorch"},
            "protocolVersion": d.protocol,
            "storageUri": f"{d.storage_uri.rstrip('/')}/{spec.name}",
            # The handlers read KServe v1 and v2 bodies themselves: no TorchServe request envelope
            # (an empty TS_SERVICE_ENVELOPE is none; the runtime would otherwise set kserve/kservev2).
            "env": [{"name": "TS_SERVICE_ENVELOPE", "value": ""}],
            "resources": {"requests": requests, "limits": limits},
        }
    metadata: dict[str, Any] = {"name": spec.name.replace("_", "-")}
    if d.namespace:
        metadata["namespace"] = d.namespace
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": metadata, "spec": {"predictor": predictor}}


def export(spec: ModelSpec, archive: Path, out: Path, deployment: Deployment) -> Path:
    """Write ``out/<name>/``: the storage tree and the manifest; returns the folder."""
    if not archive.is_file():
        raise ArchiverError(f"{archive} does not exist: ts-archive build {spec.name} first")
    folder = Path(out) / spec.name
    (folder / "model-store").mkdir(parents=True, exist_ok=True)
    target = folder / "model-store" / archive.name
    if deployment.gpu:
        # TorchServe's workers use a GPU only when the archive says deviceType gpu (a copy with new sums;
        # a signature of the original would not fit it, so none is copied).
        Archive(archive).rewrite(target, lambda config: config.update(deviceType="gpu"))
    else:
        shutil.copy2(archive, target)
        if Archive(archive).signature_path.is_file():
            shutil.copy2(Archive(archive).signature_path, folder / "model-store")
    if deployment.runtime == RUNTIME_NAME:  # it reads the archive itself: no TorchServe config
        write_runtime(Path(out), deployment)
    else:
        (folder / "config").mkdir(exist_ok=True)
        (folder / "config" / "config.properties").write_text(config_properties(spec, archive.name))
    manifest = yaml.safe_dump(inference_service(spec, deployment), sort_keys=False)
    (folder / "inferenceservice.yaml").write_text(f"# ts-archive kserve: copy {folder} to {deployment.storage_uri.rstrip('/')}/{spec.name}, then kubectl apply -f this\n" + manifest)
    return folder


def serving_runtime(deployment: Deployment) -> dict[str, Any]:
    """The ClusterServingRuntime (serving.kserve.io/v1alpha1) of this library's runtime: KServe's model server
    over the storage tree KServe mounts, probes on its health routes, a non-root container."""
    container = {
        "name": "kserve-container",
        "image": deployment.image,
        "args": [f"--model_dir={MOUNT}/model-store", "--host=0.0.0.0", "--http_port=8080", "--grpc_port=8081"],
        "ports": [{"containerPort": 8080, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8080}, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": 8080}, "initialDelaySeconds": 30, "periodSeconds": 10},
        "resources": {"requests": {"cpu": deployment.cpu, "memory": deployment.memory}, "limits": {"cpu": deployment.cpu, "memory": deployment.memory}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
    }
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ClusterServingRuntime",
        "metadata": {"name": RUNTIME_NAME},
        "spec": {
            "supportedModelFormats": [{"name": MODEL_FORMAT, "version": "1", "autoSelect": True}],
            "protocolVersions": ["v1", "v2", "grpc-v2"],
            "multiModel": False,
            "containers": [container],
        },
    }


def write_runtime(out: Path, deployment: Deployment) -> Path:
    """``out/serveready-runtime.yaml`` (kubectl apply it once per cluster) and ``out/Dockerfile`` (its image)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "serveready-runtime.yaml"
    path.write_text("# ts-archive kserve --runtime serveready: kubectl apply -f this once per cluster (image: build out/Dockerfile)\n"
                    + yaml.safe_dump(serving_runtime(deployment), sort_keys=False))
    (out / "Dockerfile").write_text((Path(__file__).with_name("Dockerfile.serveready")).read_text())
    return path
