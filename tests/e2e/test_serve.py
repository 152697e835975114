"""End to end: ts-server starts TorchServe, ts-manage registers, HTTP answers."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from serveready.scripts.client import Management
from serveready.scripts.runinfo import RunDir, ScriptError, TokenKind
from serveready.scripts.server import free_ports
from tests.conftest import reference_net, repack
from tests.e2e.conftest import Api


def ts_manage(run: RunDir, *args: str) -> subprocess.CompletedProcess:
    """The installed console command, as a user runs it."""
    return subprocess.run([str(Path(sys.executable).parent / "ts-manage"), "--run-dir", str(run.path), *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def registered(server: RunDir) -> RunDir:
    done = ts_manage(server, "register", "net.mar", "--workers", "1", "--batch-size", "1", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "registered net from net.mar: 1 CPU worker(s) READY; it runs with torch float32 on cpu, 1 torch thread(s)"
    batched = ts_manage(server, "register", "net.mar", "--name", "net_batched", "--workers", "1", "--batch-size", "8", "--max-batch-delay", "200")
    assert batched.returncode == 0, batched.stderr
    assert "\nnote: batchSize 8 with maxBatchDelay 200 ms: when a worker dies, TorchServe 0.12 never answers" in batched.stdout
    return server


def _describe(run: RunDir, name: str) -> dict:
    done = ts_manage(run, "describe", name)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)[0]


@pytest.fixture(scope="module")
def weights(net_spec, registered: RunDir) -> Path:  # noqa: ANN001
    return net_spec.weights


def test_predictions_equal_in_process_model(registered: RunDir, api: Api, weights: Path) -> None:
    rows = np.random.default_rng(3).normal(size=(7, 10)).astype(np.float32)
    reply = api.predict("net", json.dumps({"inputs": rows.tolist()}))
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(reply.json()["predictions"], reference_net(weights, rows), rtol=1e-5, atol=1e-5)
    one = api.predict("net", json.dumps({"inputs": rows[0].tolist()}))
    np.testing.assert_allclose(one.json()["predictions"], reply.json()["predictions"][:1], rtol=1e-6)


def test_describe_shows_the_registered_settings(registered: RunDir) -> None:
    net, batched = _describe(registered, "net"), _describe(registered, "net_batched")
    assert (net["batchSize"], batched["batchSize"], batched["maxBatchDelay"]) == (1, 8, 200)
    assert [w["status"] for w in net["workers"]] == ["READY"] and net["deviceType"] == "cpu"


BAD_INPUTS = [
    ("not json", "request body is not valid JSON: Expecting value at line 1 column 1"),
    ("", "request body is empty"),
    ('{"values": [1,2,3,4,5,6,7,8,9,10]}', "request body has no 'inputs' key (keys: 'values')"),
    ('{"inputs": [1,2,3,4,5,6,7,8,9]}', "row 0 has 9 values, expected 10"),
    ('{"inputs": [1,2,3,4,"five",6,7,8,9,10]}', 'row 0, column 4 is "five" (a JSON string), expected a number'),
    ('{"inputs": [1,2,3,NaN,5,6,7,8,9,10]}', "row 0, column 3 is NaN (a JSON number), expected a finite number"),
    ('{"inputs": [1,2,3,4,5,6,7,8,9,Infinity]}', "row 0, column 9 is Infinity (a JSON number), expected a finite number"),
    ('{"inputs": []}', "'inputs' is empty"),
    ('{"inputs": [' + "9" * 5000 + ",2,3,4,5,6,7,8,9,10]}", "request body is not valid JSON: Exceeds the limit (4300 digits) for integer string conversion"),
    ('{"inputs": [[1,2,3,4,5,6,7,8,9,10],[1,2]]}', "row 1 has 2 values, expected 10"),
    ('{"inputs": [[1,2,3,4,5,6,7,8,9,10],3]}', "'inputs' mixes numbers and lists"),
    (json.dumps({"inputs": [[0] * 10] * 1025}), "'inputs' has 1025 rows, more than the limit of 1024 rows per request"),
    ("[1,2,3]", "request body must be a JSON object"),
]


@pytest.mark.parametrize(("body", "message"), BAD_INPUTS)
def test_bad_input_gets_400_naming_the_problem(registered: RunDir, api: Api, body: str, message: str) -> None:
    reply = api.predict("net", body)
    assert reply.status_code == 400
    assert reply.json()["type"] == "InvalidInput" and message in reply.json()["message"]


def test_form_encoded_body_is_explained(registered: RunDir, api: Api) -> None:
    reply = api.predict("net", '{"inputs": [1,2,3,4,5,6,7,8,9,10]}', content_type="application/x-www-form-urlencoded")
    assert reply.status_code == 400 and "Content-Type: application/json" in reply.json()["message"]


def test_worker_survives_bad_input(registered: RunDir, api: Api, weights: Path) -> None:
    before = [w["pid"] for w in _describe(registered, "net")["workers"]]
    for body, _ in BAD_INPUTS:
        assert api.predict("net", body).status_code == 400
    row = [0.25] * 10
    reply = api.predict("net", json.dumps({"inputs": row}))
    assert reply.status_code == 200
    np.testing.assert_allclose(reply.json()["predictions"], reference_net(weights, np.array([row], np.float32)), rtol=1e-5, atol=1e-5)
    assert [w["pid"] for w in _describe(registered, "net")["workers"]] == before


def test_batched_model_answers_concurrent_good_and_bad_requests(registered: RunDir, api: Api, weights: Path) -> None:
    rng = np.random.default_rng(4)
    payloads: list[tuple[str, np.ndarray | None]] = []
    for i in range(32):
        if i % 3 == 1:
            payloads.append((BAD_INPUTS[i % len(BAD_INPUTS)][0], None))
        else:
            rows = rng.normal(size=(1 + i % 4, 10)).astype(np.float32)
            payloads.append((json.dumps({"inputs": rows.tolist()}), rows))
    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(lambda p: api.predict("net_batched", p[0]), payloads))
    for (_, rows), reply in zip(payloads, replies, strict=True):
        if rows is None:
            assert reply.status_code == 400, reply.text
        else:
            assert reply.status_code == 200, reply.text
            np.testing.assert_allclose(reply.json()["predictions"], reference_net(weights, rows), rtol=1e-5, atol=1e-5)


def test_token_authorization_is_enforced(registered: RunDir, api: Api) -> None:
    url = registered.inference_url
    assert requests.get(f"{url}/ping", timeout=10).status_code == 400
    assert requests.get(f"{url}/ping", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 400
    assert api.predict("net", '{"inputs": [0,0,0,0,0,0,0,0,0,0]}', token=None).status_code == 400
    inference_key = registered.token(TokenKind.INFERENCE)
    reply = requests.get(f"{registered.management_url}/models", headers={"Authorization": f"Bearer {inference_key}"}, timeout=10)
    assert reply.status_code == 400


def test_server_listens_on_loopback_only(registered: RunDir) -> None:
    props = registered.properties()
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")


def test_gpu_request_on_cpu_server_registers_nothing(registered: RunDir) -> None:
    done = ts_manage(registered, "register", "net.mar", "--name", "net_gpu", "--device", "gpu")
    assert done.returncode == 1
    assert done.stderr == "ts-manage: error: GPU workers were asked for, but this server has no GPU (number_of_gpu=0); use --device cpu\n"
    assert "net_gpu" not in ts_manage(registered, "list").stdout


def test_unknown_model_wrong_token_and_down_server_are_one_line(registered: RunDir) -> None:
    unknown = ts_manage(registered, "describe", "nope")
    assert (unknown.returncode, unknown.stderr) == (1, "ts-manage: error: GET /models/nope failed with HTTP 404: Model not found: nope\n")
    token = ts_manage(registered, "--token", "wrong", "list")
    assert token.returncode == 1 and token.stderr.startswith("ts-manage: error: the management key was refused")
    [port] = free_ports(1)
    down = ts_manage(registered, "--url", f"http://127.0.0.1:{port}", "list")
    assert down.returncode == 1 and down.stderr.startswith("ts-manage: error: cannot reach TorchServe's management API")
    for done in (unknown, token, down):
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_only_archives_from_the_model_store_load(registered: RunDir, tmp_path: Path) -> None:
    outside = tmp_path / "net.mar"
    outside.write_bytes((registered.model_store / "net.mar").read_bytes())
    done = ts_manage(registered, "register", str(outside), "--name", "outside")
    assert done.returncode == 1 and "is outside the model store" in done.stderr
    client = Management(registered.management_url, registered.token(TokenKind.MANAGEMENT))
    for url in ("file:///etc/passwd", "http://127.0.0.1:1/x.mar", "../net.mar"):
        with pytest.raises(ScriptError, match="HTTP 404"):
            client.call("POST", "/models", url=url, model_name="evil")


def test_scale_set_default_and_unregister(registered: RunDir, api: Api) -> None:
    scaled = ts_manage(registered, "scale", "net_batched", "--min", "2")
    assert scaled.returncode == 0 and scaled.stdout.startswith("scaled net_batched: 2 worker(s) READY") and "note:" not in scaled.stdout
    assert len(_describe(registered, "net_batched")["workers"]) == 2
    down = ts_manage(registered, "scale", "net_batched", "--min", "1")
    assert down.returncode == 0 and len(_describe(registered, "net_batched")["workers"]) == 1
    assert down.stdout.splitlines()[1].startswith("note: TorchServe 0.12 stops the extra workers at once, mid-batch")
    default = ts_manage(registered, "set-default", "net_batched", "1.0")
    assert default.returncode == 0 and "net_batched" in default.stdout
    gone = ts_manage(registered, "unregister", "net_batched")
    assert gone.returncode == 0
    assert api.predict("net_batched", '{"inputs": [0,0,0,0,0,0,0,0,0,0]}').status_code == 404


def test_a_second_server_runs_beside_the_first(registered: RunDir, net_archive: Path, tmp_path: Path) -> None:
    """Own run folder, TMPDIR and ports (gRPC included): both answer, and stopping one leaves the other."""
    from serveready.scripts.server import isolated, start, stop

    store = tmp_path / "store"
    store.mkdir()
    (store / "net.mar").write_bytes(net_archive.read_bytes())
    second = start(isolated(tmp_path / "run", store))
    try:
        assert ts_manage(second, "register", "net.mar").returncode == 0
        assert Api(second).predict("net", '{"inputs": [0,0,0,0,0,0,0,0,0,0]}').status_code == 200
    finally:
        stop(second.path)
    assert Api(registered).predict("net", '{"inputs": [0,0,0,0,0,0,0,0,0,0]}').status_code == 200


def test_an_archive_that_cannot_load_is_reported_and_not_left_registered(registered: RunDir) -> None:
    """Its workers would crash-loop forever: ts-manage says why, from the worker's log, and unregisters it."""
    import yaml

    def tflite(entries: dict[str, bytes]) -> None:
        config = yaml.safe_load(entries["model-config.yaml"])
        config["model"]["format"] = "tflite"
        entries["model-config.yaml"] = yaml.safe_dump(config).encode()

    repack(registered.model_store / "net.mar", registered.model_store / "broken.mar", tflite)
    done = ts_manage(registered, "register", "broken.mar")
    assert done.returncode == 1
    assert "'broken' is not registered; the worker said: model.format 'tflite' is not one of" in done.stderr
    assert '"broken"' not in ts_manage(registered, "list").stdout
    again = ts_manage(registered, "register", "net.mar")
    assert again.returncode == 1 and "model 'net' is already registered" in again.stderr


def test_register_without_settings_takes_the_archives_own(registered: RunDir, net_spec) -> None:  # noqa: ANN001
    done = ts_manage(registered, "register", "net.mar", "--name", "net_as_built")
    assert done.returncode == 0, done.stderr
    management = Management.from_run(registered)
    try:
        described = _describe(registered, "net_as_built")
        serve = net_spec.serve
        assert (described["minWorkers"], described["batchSize"], described["maxBatchDelay"]) == (serve.minWorkers, serve.batchSize, serve.maxBatchDelay)
        assert len(described["workers"]) == serve.minWorkers
    finally:
        management.unregister("net_as_built")
    # A plain TorchServe registration (no parameters) reads the archive alone: it must never get
    # TorchServe's 100 ms default delay, which is what maxBatchDelay 0 in an archive turns into.
    management.call("POST", "/models", url="net.mar", model_name="net_plain", initial_workers=1, synchronous="true")
    try:
        plain = _describe(registered, "net_plain")
        assert plain["batchSize"] == 1 or plain["maxBatchDelay"] <= 5, plain
    finally:
        management.unregister("net_plain")


def test_metrics_are_prometheus_and_logs_are_lean(registered: RunDir, api: Api) -> None:
    for _ in range(3):
        assert api.predict("net", '{"inputs": [0,0,0,0,0,0,0,0,0,0]}').status_code == 200
    metrics = requests.get(registered.properties()["metrics_address"] + "/metrics", timeout=10)
    assert metrics.status_code == 200
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    family = families.get("ts_inference_requests") or families["ts_inference_requests_total"]
    requests_total = {s.labels.get("model_name"): s.value for s in family.samples}
    assert requests_total.get("net", 0) >= 3
    logs = registered.log_dir
    assert "POST /predictions/net" in (logs / "access_log.log").read_text()  # kept (asynchronous)
    model_log = (logs / "model_log.log").read_text()
    assert "Backend received inference at" not in model_log  # TorchServe's per-batch line, dropped by the handler
    assert "serveready" in model_log  # the handler's own load line is still there
    assert not (logs / "ts_metrics.log").exists() or "ts_inference_latency" not in (logs / "ts_metrics.log").read_text()


def test_delay_zero_pairs_only_what_is_queued(registered: RunDir, api: Api, weights: Path) -> None:
    """batchSize 8 with maxBatchDelay 0: every answer right, whatever batch it rode in (TorchServe takes at most 2)."""
    done = ts_manage(registered, "register", "net.mar", "--name", "net_d0", "--workers", "1", "--batch-size", "8", "--max-batch-delay", "0")
    assert done.returncode == 0, done.stderr
    try:
        rng = np.random.default_rng(5)
        rows = [rng.normal(size=(1, 10)).astype(np.float32) for _ in range(48)]
        with ThreadPoolExecutor(max_workers=12) as pool:
            replies = list(pool.map(lambda r: api.predict("net_d0", json.dumps({"inputs": r.tolist()})), rows))
        for r, reply in zip(rows, replies, strict=True):
            assert reply.status_code == 200, reply.text
            assert reply.headers["Content-Type"].startswith("application/json")
            np.testing.assert_allclose(reply.json()["predictions"], reference_net(weights, r), rtol=1e-5, atol=1e-5)
    finally:
        Management.from_run(registered).unregister("net_d0")


def test_info_prints_curl_lines_that_work(registered: RunDir) -> None:
    """`ts-server info` (what `make serve` ends with): a curl line per kind of model, made from the archive's sample shape."""
    import shlex

    done = subprocess.run([str(Path(sys.executable).parent / "ts-server"), "--run-dir", str(registered.path), "info"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    [line] = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith("curl") and line.strip().endswith("/predictions/net")]
    assert '{"inputs": [' + ", ".join(["0.5"] * 10) + "]}" in line
    words = shlex.split(line)
    headers = dict(words[i + 1].split(": ", 1) for i, w in enumerate(words) if w == "-H")
    reply = requests.post(words[-1], data=words[words.index("-d") + 1], headers=headers, timeout=30)
    assert reply.status_code == 200 and len(reply.json()["predictions"]) == 1
