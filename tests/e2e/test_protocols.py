"""KServe v1 and Open Inference Protocol v2 on a real TorchServe, with a real third-party client (tritonclient)."""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from serveready.scripts.runinfo import RunDir, TokenKind
from tests.conftest import digits_split, reference_net, render_digit
from tests.e2e.conftest import Api

ROWS = np.random.default_rng(17).normal(size=(4, 10)).astype(np.float32)


@pytest.fixture(scope="module")
def served(server: RunDir) -> RunDir:
    from tests.e2e.test_serve import ts_manage

    for name in ("net", "digits"):
        done = ts_manage(server, "register", f"{name}.mar", "--name", f"oip_{name}")
        assert done.returncode == 0, done.stderr
    return server


def _key(run: RunDir) -> dict[str, str]:
    return {"Authorization": f"Bearer {run.token(TokenKind.INFERENCE)}"}


def _client(run: RunDir) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=run.inference_url.removeprefix("http://"))


def test_kserve_v1_and_v2_paths_reach_the_handler(served: RunDir, net_spec) -> None:  # noqa: ANN001
    url, key = served.inference_url, _key(served)
    v1 = requests.post(f"{url}/v1/models/oip_net:predict", json={"instances": ROWS.tolist()}, headers=key, timeout=30)
    assert v1.status_code == 200, v1.text
    np.testing.assert_allclose(v1.json()["predictions"], reference_net(net_spec.weights, ROWS), atol=1e-5)
    body = {"id": "a1", "inputs": [{"name": "rows", "shape": [4, 10], "datatype": "FP32", "data": ROWS.flatten().tolist()}]}
    v2 = requests.post(f"{url}/v2/models/oip_net/infer", json=body, headers=key, timeout=30)
    assert v2.status_code == 200, v2.text
    answer = v2.json()
    assert (answer["model_name"], answer["id"], answer["outputs"][0]["shape"]) == ("oip_net", "a1", [4, 1])
    bad = requests.post(f"{url}/v2/models/oip_net/infer", json={"inputs": [{"name": "rows", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
                        headers=key, timeout=30)
    assert bad.status_code == 400 and bad.json() == {"error": "v2: input 'rows': expected numbers of shape [rows, 10] (or [10]), got [1, 3]"}
    health = requests.get(f"{url}/v2/health/ready", headers=key, timeout=30)
    assert health.status_code == 200 and health.json() == {"ready": True}


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infers_net_like_our_json_api(served: RunDir, binary: bool) -> None:
    client, key = _client(served), _key(served)
    assert client.is_server_live(headers=key) and client.is_server_ready(headers=key)
    rows = triton.InferInput("rows", list(ROWS.shape), "FP32")
    rows.set_data_from_numpy(ROWS, binary_data=binary)
    result = client.infer("oip_net", [rows], headers=key, request_id="r-1")
    ours = Api(served).predict("oip_net", json.dumps({"inputs": ROWS.tolist()}))
    np.testing.assert_allclose(result.as_numpy("predictions"), np.array(ours.json()["predictions"]), rtol=1e-6)
    assert result.get_response()["id"] == "r-1"


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_classifies_digit_images_like_our_json_api(served: RunDir, binary: bool) -> None:
    client, key = _client(served), _key(served)
    split = digits_split()
    pngs = [render_digit((split["x_test"][i, 0] * 16).numpy(), (40, 40)) for i in range(3)]
    # BYTES: raw files with the binary extension, base64 strings in JSON
    images = triton.InferInput("image", [3], "BYTES")
    images.set_data_from_numpy(np.array(pngs if binary else [base64.b64encode(p) for p in pngs], dtype=np.object_), binary_data=binary)
    probabilities = client.infer("oip_digits", [images], headers=key).as_numpy("probabilities")
    assert probabilities.shape == (3, 10)
    ours = [Api(served).predict("oip_digits", png, content_type="image/png").json()["predictions"][0] for png in pngs]
    assert probabilities.argmax(axis=1).tolist() == [p["index"] for p in ours]
    np.testing.assert_allclose(probabilities.max(axis=1), [p["probability"] for p in ours], rtol=1e-4)


def test_tritonclient_reads_our_errors_and_what_torchserve_does_not_serve(served: RunDir) -> None:
    client, key = _client(served), _key(served)
    wrong = triton.InferInput("rows", [1, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32), binary_data=False)
    with pytest.raises(InferenceServerException, match=r"v2: input 'rows': expected numbers of shape \[rows, 10\]"):
        client.infer("oip_net", [wrong], headers=key)
    # TorchServe 0.12 has no v2 model metadata route (its OIP handler serves health and server metadata only)
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("oip_net", headers=key)
    assert client.get_server_metadata(headers=key)["name"] == "Torchserve"


def test_the_metrics_endpoint_has_torchserves_and_the_handlers_counters(served: RunDir) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    api = Api(served)
    for _ in range(3):
        assert api.predict("oip_net", json.dumps({"inputs": ROWS.tolist()})).status_code == 200
    assert api.predict("oip_net", '{"inputs": [1, 2]}').status_code == 400
    metrics_url = served.properties()["metrics_address"]
    samples: dict[tuple[str, frozenset], float] = {}
    for _ in range(50):  # the worker's metric lines reach the frontend asynchronously
        text = requests.get(f"{metrics_url}/metrics", timeout=30).text
        samples = {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples}
        if any(name == "serveready_refused_total" and ("ModelName", "oip_net") in labels for name, labels in samples):
            break
        time.sleep(0.2)

    def value(name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)

    assert value("ts_inference_requests_total") >= 4
    assert value("serveready_batches_total", ModelName="oip_net") >= 4
    assert value("serveready_rows_total", ModelName="oip_net") >= 3 * len(ROWS)
    assert value("serveready_stage_ms_total", ModelName="oip_net", Stage="inference") > 0
    assert value("serveready_refused_total", ModelName="oip_net", Status="400", Error="InvalidInput") >= 1
