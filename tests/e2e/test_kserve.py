"""The KServe storage tree: TorchServe started from its own config/config.properties serves its model-store.

KServe's TorchServe runtime starts ``torchserve --ts-config /mnt/models/config/config.properties``
and sets ports and the request envelope through TS_* variables (enable_envvars_config=true):
here the same variables point it at free loopback ports and at the tree instead of /mnt/models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from serveready.archiver import ModelSpec
from serveready.archiver.kserve import Deployment, export
from serveready.scripts.server import free_ports, java_home
from tests.conftest import reference_net

ROWS = np.random.default_rng(23).normal(size=(3, 10)).astype(np.float32)


@pytest.fixture(scope="module")
def kserve_tree(net_spec: ModelSpec, net_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(net_spec, net_archive, tmp_path_factory.mktemp("kserve"), Deployment(protocol="v2", canary_percent=10, max_replicas=3))


@pytest.fixture(scope="module")
def pod(kserve_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """TorchServe as the runtime starts it, from the tree's config, with the manifest's env."""
    scratch = tmp_path_factory.mktemp("pod")
    inference, management, metrics, grpc_i, grpc_m = free_ports(5)
    manifest = yaml.safe_load((kserve_tree / "inferenceservice.yaml").read_text())
    env = {**os.environ, "TMPDIR": str(scratch), "TEMP": str(scratch), "LOG_LOCATION": str(scratch), "METRICS_LOCATION": str(scratch),
           "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{inference}", "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{management}",
           "TS_METRICS_ADDRESS": f"http://127.0.0.1:{metrics}", "TS_GRPC_INFERENCE_PORT": str(grpc_i), "TS_GRPC_MANAGEMENT_PORT": str(grpc_m),
           "TS_MODEL_STORE": str(kserve_tree / "model-store"),
           **{e["name"]: e["value"] for e in manifest["spec"]["predictor"]["model"]["env"]}}
    if java_home():
        env["JAVA_HOME"] = java_home()
    launcher = str(Path(sys.executable).with_name("torchserve"))
    with open(scratch / "torchserve.out", "w") as out:
        subprocess.run([launcher, "--start", "--ts-config", str(kserve_tree / "config" / "config.properties"),
                        "--model-store", str(kserve_tree / "model-store")], env=env, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=120)
    urls = {"inference": f"http://127.0.0.1:{inference}", "management": f"http://127.0.0.1:{management}", "metrics": f"http://127.0.0.1:{metrics}"}
    try:
        deadline = time.monotonic() + 120
        while True:  # the snapshot loads the model at start: READY workers, no register call
            try:
                workers = requests.get(f"{urls['management']}/models/net", timeout=5).json()[0]["workers"]
                if workers and all(w["status"] == "READY" for w in workers):
                    break
            except (requests.RequestException, KeyError, IndexError, ValueError):
                pass
            assert time.monotonic() < deadline, (scratch / "torchserve.out").read_text()[-3000:]
            time.sleep(0.5)
        yield urls
    finally:
        subprocess.run([launcher, "--stop"], env=env, capture_output=True, timeout=60)


def test_the_tree_holds_config_store_and_manifest(kserve_tree: Path, net_archive: Path) -> None:
    assert sorted(p.relative_to(kserve_tree).as_posix() for p in kserve_tree.rglob("*") if p.is_file()) == [
        "config/config.properties", "inferenceservice.yaml", "model-store/net.mar"]
    assert (kserve_tree / "model-store" / "net.mar").read_bytes() == net_archive.read_bytes()
    manifest = yaml.safe_load((kserve_tree / "inferenceservice.yaml").read_text())
    predictor = manifest["spec"]["predictor"]
    assert (manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"]) == ("serving.kserve.io/v1beta1", "InferenceService", "net")
    assert (predictor["canaryTrafficPercent"], predictor["minReplicas"], predictor["maxReplicas"]) == (10, 1, 3)
    assert predictor["model"]["protocolVersion"] == "v2" and predictor["model"]["modelFormat"] == {"name": "pytorch"}
    assert predictor["model"]["storageUri"] == "pvc://models/net"


def test_torchserve_from_the_generated_config_answers_v1_and_v2(pod: dict[str, str], net_spec: ModelSpec) -> None:
    described = requests.get(f"{pod['management']}/models/net", timeout=10).json()[0]
    assert (described["batchSize"], described["maxBatchDelay"], described["minWorkers"]) == (net_spec.serve.batchSize, 0, 2)  # as tuned, delay 0 kept
    expected = reference_net(net_spec.weights, ROWS)
    v1 = requests.post(f"{pod['inference']}/v1/models/net:predict", json={"instances": ROWS.tolist()}, timeout=30)
    assert v1.status_code == 200, v1.text
    np.testing.assert_allclose(v1.json()["predictions"], expected, atol=1e-5)
    v2 = requests.post(f"{pod['inference']}/v2/models/net/infer", timeout=30,
                       json={"id": "k", "inputs": [{"name": "rows", "shape": [3, 10], "datatype": "FP32", "data": ROWS.flatten().tolist()}]})
    assert v2.status_code == 200, v2.text
    np.testing.assert_allclose(np.array(v2.json()["outputs"][0]["data"]).reshape(3, 1), expected, atol=1e-5)
    assert requests.get(f"{pod['inference']}/v2/health/ready", timeout=10).json() == {"ready": True}
    assert "ts_inference_requests_total" in requests.get(f"{pod['metrics']}/metrics", timeout=10).text
    refused = requests.post(f"{pod['management']}/models", params={"url": "net.mar"}, timeout=10)
    assert refused.status_code == 405  # the model API is off in the pod
    assert json.loads(refused.text)["code"] == 405
