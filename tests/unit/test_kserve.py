"""KServe storage trees and InferenceService manifests, checked against the CRD's own schema (vendored, pruned)."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from serveready.archiver import ArchiverError, ModelSpec
from serveready.archiver.kserve import Deployment, export, inference_service
from serveready.handlers.archive import Archive
from serveready.scripts.runinfo import read_properties
from tests.conftest import ROOT

SCHEMA = yaml.safe_load((ROOT / "tests" / "data" / "inferenceservice-v1beta1.pruned.yaml").read_text())
#: Kubernetes object names (RFC 1123 labels)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists properties (kubectl's --validate=strict)."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "properties" in node:
                node.setdefault("additionalProperties", False)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


VALIDATOR = jsonschema.Draft7Validator(_strict(SCHEMA))


def _errors(manifest: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in VALIDATOR.iter_errors(manifest)]


@pytest.mark.parametrize("deployment", [
    Deployment(),
    Deployment(protocol="v2", gpu=True, min_replicas=0, max_replicas=4, canary_percent=20, namespace="models", cpu="500m", memory="1Gi"),
])
def test_manifests_validate_against_the_crd_schema(net_spec: ModelSpec, deployment: Deployment) -> None:
    manifest = inference_service(net_spec, deployment)
    assert _errors(manifest) == []
    assert DNS_LABEL.match(manifest["metadata"]["name"])
    model = manifest["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == deployment.protocol and model["storageUri"] == "pvc://models/net"
    assert ("nvidia.com/gpu" in model["resources"]["limits"]) is deployment.gpu


def test_the_validator_does_refuse_what_kubernetes_would(net_spec: ModelSpec) -> None:
    manifest = inference_service(net_spec, Deployment())
    broken = copy.deepcopy(manifest)
    broken["spec"]["predictor"]["model"]["storageURI"] = broken["spec"]["predictor"]["model"].pop("storageUri")
    assert any("storageURI" in e for e in _errors(broken))
    broken = copy.deepcopy(manifest)
    broken["spec"]["predictor"]["minReplicas"] = "1"
    assert any("minReplicas" in e for e in _errors(broken))
    broken = copy.deepcopy(manifest)
    broken["spec"]["predictor"]["model"]["resources"]["limits"]["memory"] = "2 GiB"
    assert any("does not match" in e for e in _errors(broken))
    assert _errors({"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {}, "spec": {}}) == ["spec: 'predictor' is a required property"]


def test_variant_names_become_kubernetes_names(net_spec: ModelSpec) -> None:
    assert inference_service(dataclasses.replace(net_spec, name="net_int8"), Deployment())["metadata"]["name"] == "net-int8"


def test_config_properties_load_the_model_with_its_serve_settings(net_spec: ModelSpec, net_archive: Path, tmp_path: Path) -> None:
    folder = export(net_spec, net_archive, tmp_path, Deployment())
    props = read_properties(folder / "config" / "config.properties")
    assert props["model_store"] == "/mnt/models/model-store" and props["inference_address"] == "http://0.0.0.0:8085"
    assert (props["enable_envvars_config"], props["enable_model_api"], props["metrics_mode"]) == ("true", "false", "prometheus")
    [(version, entry)] = json.loads(props["model_snapshot"])["models"]["net"].items()
    serve = net_spec.serve
    assert version == net_spec.version and entry["marName"] == "net.mar"
    assert (entry["minWorkers"], entry["batchSize"], entry["maxBatchDelay"]) == (serve.minWorkers, serve.batchSize, serve.maxBatchDelay)


def test_gpu_trees_carry_an_archive_that_asks_for_the_gpu(net_spec: ModelSpec, net_archive: Path, tmp_path: Path) -> None:
    folder = export(net_spec, net_archive, tmp_path, Deployment(gpu=True))
    copied = folder / "model-store" / "net.mar"
    with zipfile.ZipFile(copied) as mar:
        assert yaml.safe_load(mar.read("model-config.yaml"))["deviceType"] == "gpu"
    assert Archive(copied).problems() == []


@pytest.mark.parametrize(("changes", "message"), [
    ({"protocol": "v3"}, "protocol must be one of v1, v2"),
    ({"min_replicas": 3, "max_replicas": 2}, "replicas"),
    ({"canary_percent": 120}, "canary percent must be 0..100"),
])
def test_impossible_deployments_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ArchiverError, match=message):
        dataclasses.replace(Deployment(), **changes)


def test_a_missing_archive_says_to_build_it(net_spec: ModelSpec, tmp_path: Path) -> None:
    with pytest.raises(ArchiverError, match="does not exist: ts-archive build net first"):
        export(net_spec, tmp_path / "net.mar", tmp_path / "out", Deployment())


RUNTIME_SCHEMA = yaml.safe_load((ROOT / "tests" / "data" / "clusterservingruntime-v1alpha1.pruned.yaml").read_text())
RUNTIME_VALIDATOR = jsonschema.Draft7Validator(_strict(RUNTIME_SCHEMA))


def test_the_serveready_runtime_validates_and_its_services_name_it(net_spec: ModelSpec, net_archive: Path, tmp_path: Path) -> None:
    from serveready.archiver.kserve import serving_runtime

    deployment = Deployment(protocol="v2", runtime="serveready", image="registry.example/serveready-kserve:0.3.0")
    runtime = serving_runtime(deployment)
    assert [f"{'/'.join(map(str, e.path))}: {e.message}" for e in RUNTIME_VALIDATOR.iter_errors(runtime)] == []
    [container] = runtime["spec"]["containers"]
    assert container["image"] == "registry.example/serveready-kserve:0.3.0" and container["securityContext"]["runAsNonRoot"] is True
    assert {container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"]} == {"/v2/health/ready", "/v2/health/live"}
    manifest = inference_service(net_spec, deployment)
    assert _errors(manifest) == []
    model = manifest["spec"]["predictor"]["model"]
    assert (model["runtime"], model["modelFormat"]["name"]) == ("serveready", runtime["spec"]["supportedModelFormats"][0]["name"])
    assert "env" not in model  # no TorchServe envelope to switch off
    folder = export(net_spec, net_archive, tmp_path, deployment)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "Dockerfile", "net/inferenceservice.yaml", "net/model-store/net.mar", "serveready-runtime.yaml"]
    assert yaml.safe_load((tmp_path / "serveready-runtime.yaml").read_text()) == runtime and folder == tmp_path / "net"


def test_the_dockerfile_runs_what_the_runtime_says(tmp_path: Path) -> None:
    """The image's ENTRYPOINT + CMD is the runtime container's command line, as a non-root user, with a HEALTHCHECK."""
    from serveready.archiver.kserve import serving_runtime

    text = (ROOT / "archiver" / "Dockerfile.serveready").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    command = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert entry == ["python", "-m", "serveready.kserve"]
    assert command == serving_runtime(Deployment(runtime="serveready"))["spec"]["containers"][0]["args"]
    assert re.search(r"^USER 1000$", text, re.M) and "HEALTHCHECK" in text and "/v2/health/ready" in text
    assert re.search(r"^FROM python:\$\{PYTHON\}-slim$", text, re.M) and "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
