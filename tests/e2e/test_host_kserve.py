"""``python -m serveready.kserve``: every archive on KServe's own model server, started as a process, driven over
HTTP, ``tritonclient`` (HTTP and gRPC) and gRPC, and answering what TorchServe answers.

``test_load`` holds ``serveready.load(...)`` to TorchServe byte for byte on every archive and request of its
corpora; here the same requests go to the KServe host (TorchServe's route, KServe v1's and v2's) and must get
the same bytes as in-process, so the KServe host answers what TorchServe answers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

import serveready
from serveready.scripts.server import free_ports
from tests.conftest import VariantBuild, reference_net
from tests.e2e.test_load import REVIEW, ROWS, corpus_of

# Not imported here: kserve's protobuf module and tritonclient.grpc's define the same messages, and cannot share a process.
if importlib.util.find_spec("kserve") is None:
    pytest.skip("pip install 'serveready[kserve]' (make setup installs it)", allow_module_level=True)
NAMES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "model_configs").glob("*.yaml"))


@dataclass(frozen=True)
class Host:
    url: str
    grpc: str
    process: subprocess.Popen
    log: Path


@contextmanager
def kserve_host(store: Path, log: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 300.0,
                argv: list[str] | None = None, cwd: Path | None = None) -> Iterator[Host]:
    """The KServe host as a user starts it, on free loopback ports (or with ``argv``'s own, which must name the ports
    through ``{http}`` and ``{grpc}``); stopped (SIGTERM, then SIGKILL) afterwards."""
    http, grpc = free_ports(2)
    command = [sys.executable, "-m", "serveready.kserve", "--model_dir", str(store), "--http_port", str(http), "--grpc_port", str(grpc), *extra]
    if argv is not None:
        command = [sys.executable if a == "python" else a.format(http=http, grpc=grpc) for a in argv]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd)
    host = Host(f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}", process, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"the KServe host exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{host.url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening yet; or (--workers) held until a worker accepts
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the KServe host was not ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield host
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def store(net_archive: Path, digits_archive: Path, sentiment_archive: Path, spoken_digits_archive: Path, variant_builds: dict[str, VariantBuild],
          tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("kserve") / "model_store"
    folder.mkdir()
    archives = {"net": net_archive, "digits": digits_archive, "sentiment": sentiment_archive, "spoken_digits": spoken_digits_archive,
                **{name: b.archive for name, b in variant_builds.items()}}
    for name, path in archives.items():
        (folder / f"{name}.mar").write_bytes(path.read_bytes())
    return folder


@pytest.fixture(scope="module")
def host(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    with kserve_host(store, tmp_path_factory.mktemp("kserve-log") / "kserve.log") as running:
        yield running


def _post(host: Host, path: str, body: bytes, content_type: str | None, headers: dict[str, str] | None = None) -> requests.Response:
    sent = dict(headers or {})
    if content_type is not None:
        sent["Content-Type"] = content_type
    return requests.post(f"{host.url}{path}", data=body, headers=sent, timeout=60)


@pytest.mark.parametrize("name", NAMES)
def test_every_archive_answers_on_kserve_what_it_answers_on_torchserve(name: str, host: Host, store: Path, tmp_path: Path) -> None:
    with serveready.load(store / f"{name}.mar", into=tmp_path / "unpacked") as model:
        for what, body, content_type, headers in corpus_of(name):
            answer = model.predict(body, content_type, headers)
            routes = [f"/predictions/{name}", f"/v1/models/{name}:predict"]
            if body.lstrip().startswith(b'{"id"') or "Inference-Header-Content-Length" in headers:
                routes.append(f"/v2/models/{name}/infer")
            for route in routes:
                reply = _post(host, route, body, content_type, headers)
                assert (reply.status_code, reply.headers.get("content-type")) == (answer.status, answer.content_type), (what, route, reply.text[:300])
                assert reply.content == answer.body, (what, route, reply.content[:300], answer.body[:300])
        what, body, content_type, headers = corpus_of(name)[0]
        explained = model.explain(body, content_type, headers)
        for route in (f"/explanations/{name}", f"/v1/models/{name}:explain"):
            reply = _post(host, route, body, content_type, headers)
            assert (reply.status_code, reply.content) == (explained.status, explained.body), (route, reply.text[:300])


def test_tritonclient_over_http_and_grpc_gets_the_models_numbers(host: Host, net_spec) -> None:  # noqa: ANN001
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    expected = reference_net(net_spec.weights, ROWS)
    for client_module, url in ((httpclient, host.url.removeprefix("http://")), (grpcclient, host.grpc)):
        client = client_module.InferenceServerClient(url)
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("net")
        tensor = client_module.InferInput("whatever_name", list(ROWS.shape), "FP32")  # input names are not enforced
        tensor.set_data_from_numpy(ROWS)
        result = client.infer("net", [tensor])
        np.testing.assert_allclose(result.as_numpy("predictions"), expected, rtol=1e-5, atol=1e-6)
    metadata = requests.get(f"{host.url}/v2/models/net", timeout=10).json()
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 10]}]
    assert metadata["outputs"] == [{"name": "predictions", "datatype": "FP32", "shape": [-1, 1]}]


def test_grpc_texts_and_bad_input_get_the_handlers_answer_and_message(host: Host, store: Path) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(host.grpc)
    texts = np.array([REVIEW.encode(), b"A boring, tedious mess."], dtype=object)
    tensor = grpcclient.InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(texts)
    got = client.infer("sentiment", [tensor]).as_numpy("probabilities")
    with serveready.load(store / "sentiment.mar") as model:
        body = json.dumps({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": [REVIEW, "A boring, tedious mess."]}]})
        want = model.predict(body.encode(), "application/json").json()["outputs"][0]
    np.testing.assert_allclose(got, np.array(want["data"], dtype=np.float32).reshape(want["shape"]), rtol=1e-6)
    short = grpcclient.InferInput("x", [1, 3], "FP32")
    short.set_data_from_numpy(np.ones((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException) as refused:
        client.infer("net", [short])
    with serveready.load(store / "net.mar") as model:
        same = json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 1, 1]}]}).encode()
        message = model.predict(same, "application/json").json()["error"]  # what the v2 route over HTTP (and TorchServe) answers
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and refused.value.message() == message


def test_health_metadata_metrics_limits_and_loopback(host: Host) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/net/ready", "/v2/models/spoken_digits/ready"):
        assert requests.get(f"{host.url}{path}", timeout=10).status_code == 200, path
    assert requests.get(f"{host.url}/v2/models/nothing/ready", timeout=10).status_code == 404
    missing = _post(host, "/predictions/nothing", b"{}", "application/json")
    assert missing.status_code == 404 and missing.json()["message"] == "Model not found: nothing"
    huge = _post(host, "/predictions/net", b"x" * (8 * 2**20 + 1), "application/json")
    assert huge.status_code == 413 and "more than the limit of 8,388,608 bytes" in huge.json()["message"]
    assert _post(host, "/predictions/net", json.dumps({"inputs": ROWS[0].tolist()}).encode(), "application/json").status_code == 200
    metrics = requests.get(f"{host.url}/metrics", timeout=10).text
    assert 'serveready_batches_total{model="net"}' in metrics and "request_predict_seconds" in metrics
    process = psutil.Process(host.process.pid)
    connections = getattr(process, "net_connections", None) or process.connections  # psutil < 6 (kserve pins it) has only the old name
    listening = {c.laddr.ip for c in connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert listening <= {"127.0.0.1", "::ffff:127.0.0.1"} and listening, listening  # gRPC's socket is dual-stack: IPv4 loopback, mapped
    log = host.log.read_text()
    assert "net on KServe's model server: net.mar runs with torch float32 on cpu" in log, log[-2000:]


def test_a_key_guards_every_call_but_health(store: Path, tmp_path: Path) -> None:
    with kserve_host(store, tmp_path / "kserve.log", "--model_name", "net", env={"SERVEREADY_KEY": "s3cret"}) as keyed:
        body = json.dumps({"inputs": ROWS[0].tolist()}).encode()
        assert _post(keyed, "/predictions/net", body, "application/json").status_code == 401
        assert _post(keyed, "/predictions/net", body, "application/json", {"Authorization": "Bearer wrong"}).status_code == 401
        assert _post(keyed, "/predictions/net", body, "application/json", {"Authorization": "Bearer s3cret"}).status_code == 200
        assert requests.get(f"{keyed.url}/v2/models/net", timeout=10).status_code == 401
        assert requests.get(f"{keyed.url}/v2/health/ready", timeout=10).status_code == 200
        assert _post(keyed, "/predictions/digits", body, "application/json", {"Authorization": "Bearer s3cret"}).status_code == 404  # not picked
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(keyed.grpc)
        assert client.is_server_ready()  # health needs no key
        tensor = grpcclient.InferInput("x", [1, 10], "FP32")
        tensor.set_data_from_numpy(ROWS[:1])
        with pytest.raises(InferenceServerException) as refused:
            client.infer("net", [tensor], headers={"authorization": "Bearer wrong"})
        assert refused.value.status() == "StatusCode.PERMISSION_DENIED" and "Token Authorization failed" in refused.value.message()
        answered = client.infer("net", [tensor], headers={"authorization": "Bearer s3cret"}).as_numpy("predictions")
        assert answered.shape == (1, 1)


def _workers(supervisor: subprocess.Popen, log: Path, count: int, loaded: int) -> list[psutil.Process]:
    """The supervisor's worker processes, once there are ``count`` of them and ``loaded`` "runs with" lines were logged."""
    deadline = time.monotonic() + 120
    while True:
        children = [c for c in psutil.Process(supervisor.pid).children() if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        if len(children) == count and log.read_text().count("net.mar runs with") >= loaded:
            return children
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)


def test_workers_share_the_ports_and_a_dead_one_is_replaced(net_archive: Path, tmp_path: Path) -> None:
    folder = tmp_path / "store"
    folder.mkdir()
    (folder / "net.mar").write_bytes(net_archive.read_bytes())
    body = json.dumps({"inputs": ROWS[0].tolist()}).encode()
    with serveready.load(folder / "net.mar", into=tmp_path / "unpacked") as model:
        want = model.predict(body, "application/json").body
    with kserve_host(folder, tmp_path / "kserve.log", "--workers", "2") as host:
        first, second = _workers(host.process, host.log, 2, 2)
        log = host.log.read_text()
        assert all(f"[{c.pid}] serveready.hosting INFO net on KServe's model server" in log for c in (first, second)), log[-2000:]
        for child in (first, second):  # both accept on the supervisor's one socket; neither binds its own
            connections = getattr(child, "net_connections", None) or child.connections
            assert {c.laddr.port for c in connections(kind="inet") if c.status == psutil.CONN_LISTEN} >= {int(host.url.rsplit(":", 1)[1])}
        assert all(_post(host, "/predictions/net", body, "application/json").content == want for _ in range(20))
        first.kill()
        answers = [_post(host, "/predictions/net", body, "application/json") for _ in range(30)]  # the other worker answers meanwhile
        assert [(a.status_code, a.content) for a in answers] == [(200, want)] * 30
        replaced = _workers(host.process, host.log, 2, 3)
        assert first.pid not in {c.pid for c in replaced} and second.pid in {c.pid for c in replaced}
        assert "exited with -9; starting another" in host.log.read_text()
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(host.grpc)  # gRPC's port is shared too (SO_REUSEPORT)
        tensor = grpcclient.InferInput("x", [1, 10], "FP32")
        tensor.set_data_from_numpy(ROWS[:1])
        assert client.infer("net", [tensor]).as_numpy("predictions").shape == (1, 1)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in replaced)  # stopping the supervisor stops its workers


def test_importing_the_module_reads_no_command_line() -> None:
    code = "import sys; sys.argv = ['x', '--no-such-flag']; import serveready.kserve; print('imported')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr
    refused = subprocess.run([sys.executable, "-m", "serveready.kserve", "--model_dir", "/nonexistent"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "model store /nonexistent is not a folder" in refused.stderr


def _install_steps(dockerfile: str, wheel: Path) -> list[list[str]]:
    """The image's ``pip install`` steps as commands for a virtualenv: its ARG defaults filled in, the wheel it
    copies named, and ``--index-url ${TORCH_INDEX}`` dropped (this machine's pip configuration names the index that
    carries torch's CPU build; download.pytorch.org is not reachable from here)."""
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    [run] = [block for block in re.findall(r"^RUN (.*?)(?<!\\)$", dockerfile, re.M | re.S) if "pip install" in block]
    steps = []
    for part in run.replace("\\\n", " ").split("&&"):
        words = shlex.split(part.strip().replace("$(ls /tmp/serveready-*.whl)", str(wheel)))
        if words[:2] != ["pip", "install"]:
            continue
        words = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], w) for w in words]
        if "--index-url" in words:
            at = words.index("--index-url")
            del words[at:at + 2]
        steps.append(words)
    return steps


def test_the_runtime_image_installs_and_serves_the_exported_tree(serveready_wheel: Path, net_spec, net_archive: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """What the serveready ClusterServingRuntime's pod runs, without a container daemon: the Dockerfile's install
    steps in a fresh virtualenv, then its ENTRYPOINT + CMD over the tree `ts-archive kserve --runtime serveready`
    writes, with /mnt/models that tree, the ports free ones and the host loopback (the pod's 0.0.0.0 is for KServe's
    ingress)."""
    from serveready.archiver.kserve import Deployment, export

    folder = export(net_spec, net_archive, tmp_path / "kserve", Deployment(runtime="serveready"))
    text = (folder.parent / "Dockerfile").read_text()
    venv = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    steps = _install_steps(text, serveready_wheel)
    assert [s[:3] for s in steps] == [["pip", "install", "torch==2.13.0"], ["pip", "install", f"{serveready_wheel}[kserve,text]"]]
    for step in steps:
        done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *step[2:]], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    argv = [*json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1)), *json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))]
    swap = {"--host=0.0.0.0": "--host=127.0.0.1", "--http_port=8080": "--http_port={http}", "--grpc_port=8081": "--grpc_port={grpc}"}
    argv = [str(venv / "bin" / "python") if a == "python" else swap.get(a, a.replace("/mnt/models", str(folder))) for a in argv]
    with kserve_host(folder, tmp_path / "runtime.log", argv=argv, cwd=tmp_path) as pod:  # not the repository: its bare serveready/ would shadow
        reply = _post(pod, "/v1/models/net:predict", json.dumps({"instances": ROWS.tolist()}).encode(), "application/json")
        assert reply.status_code == 200, reply.text
        np.testing.assert_allclose(np.array(reply.json()["predictions"]), reference_net(net_spec.weights, ROWS), rtol=1e-5, atol=1e-6)
    assert "/image/lib/" in pod.log.read_text()  # the code ran from the image's virtualenv (its log names where)
