"""``serveready.ray:app`` on a real two-node Ray cluster on loopback, started and driven as a user would:
``ray start --head`` and ``ray start --address`` (each node with its own CPU), ``ts-archive ray`` (the Serve
config), ``serve deploy``, then HTTP. Replicas on both nodes; the archives' answers byte for byte what
TorchServe answers (through ``serveready.load``, which ``test_load`` holds to TorchServe); one replica killed
under load.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
import yaml

import serveready
from serveready.scripts.server import free_ports
from tests.conftest import VariantBuild
from tests.e2e.test_load import ROWS, corpus_of

pytest.importorskip("ray.serve", reason="pip install 'serveready[ray]' (make setup installs it)")
MODELS = tuple(sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "model_configs").glob("*.yaml")))  # the whole store
REPLICA_CPUS = "0.05"  # 28 replicas (net has 2) on two one-CPU nodes: Ray's CPUs are reservations, not cores
UNPLACED = "unplaced"
# A private loopback cluster: Ray 2.60 turns token auth on when a token file exists (a local ray.init() writes
# ~/.ray/auth_token), and a node started without it then cannot join; the mode is set explicitly for every process.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
KEY = "r4y-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Cluster:
    address: str       # the GCS, 127.0.0.1:PORT
    url: str           # Serve's HTTP proxy
    dashboard: str
    temp: Path
    log: Path
    metrics: list[str]  # each node's Prometheus export (Ray's metrics agent)


def _run(command: list[str], log: Path, timeout: float = 180) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(command)}\n".encode())
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, **RAY_ENV})
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command[:3])} failed ({done.returncode}):\n{log.read_text()[-3000:]}")


def _ours(temp: Path, gcs: int) -> list[psutil.Process]:
    """The processes of this cluster only: those whose command lines carry its temp dir or its GCS port, and their
    children (Ray's agents and workers rename themselves, ``ray::DashboardAgent``, and carry neither)."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if str(temp) in line or f"127.0.0.1:{gcs}" in line or f"--gcs_server_port={gcs}" in line:
            found[process.pid] = process
            try:
                found.update({child.pid: child for child in process.children(recursive=True)})
            except psutil.Error:
                pass
    return list(found.values())


@contextmanager
def ray_cluster(log: Path) -> Iterator[Cluster]:
    temp = Path(tempfile.mkdtemp(prefix="sr-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    gcs, dashboard, agent_head, agent_node, http, client, metrics_head, metrics_node = free_ports(8)
    ray = str(BIN / "ray")
    node = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    before = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)  # this process's state API calls (list_actors) talk to the same cluster
    try:
        _run([ray, "start", "--head", f"--port={gcs}", f"--temp-dir={temp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
              f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent_head}", f"--ray-client-server-port={client}", f"--metrics-export-port={metrics_head}",
              "--min-worker-port=21000", "--max-worker-port=21499", *node], log)
        _run([ray, "start", f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={agent_node}", f"--metrics-export-port={metrics_node}",
              "--min-worker-port=21500", "--max-worker-port=21999", *node], log)
        yield Cluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{http}", f"http://127.0.0.1:{dashboard}", temp, log,
                      [f"http://127.0.0.1:{metrics_head}/metrics", f"http://127.0.0.1:{metrics_node}/metrics"])
    finally:
        for k, v in before.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        processes = _ours(temp, gcs)
        for process in processes:
            try:
                process.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(processes, timeout=15)
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass


@pytest.fixture(scope="module")
def store(net_archive: Path, digits_archive: Path, sentiment_archive: Path, spoken_digits_archive: Path, variant_builds: dict[str, VariantBuild],
          tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ray") / "model_store"
    folder.mkdir()
    archives = {"net": net_archive, "digits": digits_archive, "sentiment": sentiment_archive, "spoken_digits": spoken_digits_archive,
                **{name: b.archive for name, b in variant_builds.items()}}
    assert sorted(archives) == list(MODELS)
    for name, path in archives.items():
        (folder / f"{name}.mar").write_bytes(path.read_bytes())
    return folder


@pytest.fixture(scope="module")
def cluster(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    log = tmp_path_factory.mktemp("ray-log") / "ray.log"
    with ray_cluster(log) as running:
        config = store.parent / "serve_config.yaml"  # as a user deploys: ts-archive ray writes the file, serve deploy sends it
        port = running.url.rsplit(":", 1)[1]
        (store / f"{UNPLACED}.mar").write_bytes((store / "net.mar").read_bytes())  # a model whose replica asks for a GPU nobody has
        _run([str(BIN / "ts-archive"), "ray", "--store", str(store), "--out", str(config), "--port", port, "--num-cpus", REPLICA_CPUS, "--replicas", "1"], log)
        document = yaml.safe_load(config.read_text())
        [application] = document["applications"]
        application["args"]["key"] = KEY
        deployments = {d["name"]: d for d in application["deployments"]}
        deployments["net"]["num_replicas"] = 2  # two, on both nodes, for the kill
        deployments[UNPLACED]["ray_actor_options"]["num_gpus"] = 1
        config.write_text(yaml.safe_dump(document))
        _run([str(BIN / "serve"), "deploy", str(config), f"--address={running.dashboard}"], log, timeout=300)
        deadline = time.monotonic() + 420
        while True:
            try:
                if all(requests.get(f"{running.url}/v2/models/{m}/ready", headers=AUTH, timeout=5).status_code == 200 for m in MODELS):
                    break
            except requests.RequestException:  # refused, or held while the application starts
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Serve application was not ready in 420 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield running


def _replicas(cluster: Cluster, model: str) -> list[dict]:
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard, filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
    return [a.__dict__ if not isinstance(a, dict) else a for a in actors if (a["class_name"] if isinstance(a, dict) else a.class_name) == f"ServeReplica:serveready:{model}"]


def _post(cluster: Cluster, path: str, body: bytes, content_type: str | None, headers: dict[str, str] | None = None) -> requests.Response:
    sent = {**AUTH, **(headers or {})}
    if content_type is not None:
        sent["Content-Type"] = content_type
    return requests.post(f"{cluster.url}{path}", data=body, headers=sent, timeout=60)


def test_replicas_run_on_both_nodes(cluster: Cluster) -> None:
    nodes = {r["node_id"] for m in MODELS for r in _replicas(cluster, m)}
    assert len(nodes) == 2, nodes
    assert len(_replicas(cluster, "net")) == 2  # net's serve: minWorkers = maxWorkers = 2


@pytest.mark.parametrize("name", MODELS)
def test_every_archive_answers_on_ray_what_it_answers_on_torchserve(name: str, cluster: Cluster, store: Path, tmp_path: Path) -> None:
    with serveready.load(store / f"{name}.mar", into=tmp_path / "unpacked") as model:
        for what, body, content_type, headers in corpus_of(name):
            answer = model.predict(body, content_type, headers)
            for route in (f"/predictions/{name}", f"/v1/models/{name}:predict"):
                reply = _post(cluster, route, body, content_type, headers)
                assert (reply.status_code, reply.headers.get("content-type")) == (answer.status, answer.content_type), (what, route, reply.text[:300])
                assert reply.content == answer.body, (what, route, reply.content[:300], answer.body[:300])
        what, body, content_type, headers = corpus_of(name)[0]
        reply = _post(cluster, f"/explanations/{name}", body, content_type, headers)
        assert (reply.status_code, reply.content) == ((e := model.explain(body, content_type, headers)).status, e.body)


def test_readiness_is_a_replica_answering(cluster: Cluster) -> None:
    """Serve would queue requests for a deployment whose replica cannot be placed: readiness says so instead."""
    assert all(requests.get(f"{cluster.url}/v2/models/{m}/ready", timeout=10).status_code == 200 for m in MODELS)
    assert requests.get(f"{cluster.url}/v2/models/{UNPLACED}/ready", timeout=10).status_code == 503
    assert requests.get(f"{cluster.url}/v2/health/ready", timeout=10).status_code == 503
    unhealthy = requests.get(f"{cluster.url}/ping", headers=AUTH, timeout=10)
    assert (unhealthy.status_code, unhealthy.json()) == (500, {"status": "Unhealthy"})


def test_ping_metadata_limits_keys_and_unknown_models(cluster: Cluster) -> None:
    assert requests.get(f"{cluster.url}/v2/models/net", headers=AUTH, timeout=10).json()["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 10]}]
    body = json.dumps({"inputs": ROWS[0].tolist()}).encode()
    for wrong in ({}, {"Authorization": "Bearer nope"}):
        refused = requests.post(f"{cluster.url}/predictions/net", data=body, headers={"Content-Type": "application/json", **wrong}, timeout=10)
        assert refused.status_code == 401 and "Token Authorization failed" in refused.json()["message"]
    assert requests.get(f"{cluster.url}/ping", timeout=10).status_code == 401  # as on TorchServe: /ping needs the key
    assert requests.get(f"{cluster.url}/v2/health/live", timeout=10).status_code == 200  # probes carry none
    huge = _post(cluster, "/predictions/net", b"x" * (8 * 2**20 + 1), "application/json")
    assert huge.status_code == 413 and "more than the limit of 8,388,608 bytes" in huge.json()["message"]
    missing = _post(cluster, "/predictions/nothing", b"{}", "application/json")
    assert missing.status_code == 404 and missing.json()["message"] == "Model not found: nothing"
    logs = "".join(p.read_text(errors="replace") for p in cluster.temp.glob("session_*/logs/**/*") if p.suffix in (".log", ".err", ".out"))
    assert "net on Ray Serve (replica pid" in logs and "net.mar runs with torch float32 on cpu" in logs


def test_a_replica_killed_under_load_loses_no_request(cluster: Cluster) -> None:
    body = json.dumps({"inputs": ROWS[0].tolist()}).encode()
    good = _post(cluster, "/predictions/net", body, "application/json").content
    expected = json.loads(good)["predictions"][0][0]
    [victim, *_] = _replicas(cluster, "net")
    results: list[tuple[int, bytes, float]] = []
    stop_at = time.monotonic() + 12

    def client() -> None:
        while time.monotonic() < stop_at:
            began = time.monotonic()
            try:
                reply = _post(cluster, "/predictions/net", body, "application/json")
                results.append((reply.status_code, reply.content, began))
            except requests.RequestException as err:
                results.append((-1, str(err).encode(), began))

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(client) for _ in range(4)]
        time.sleep(3)
        killed = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        for future in running:
            future.result()
    def is_right(status: int, content: bytes) -> bool:  # alone or in a batch of two: the same number to float32 rounding
        return status == 200 and abs(json.loads(content)["predictions"][0][0] - expected) <= 1e-5 * max(1.0, abs(expected))

    right = sum(1 for status, content, _ in results if is_right(status, content))
    wrong = [(s, c[:200]) for s, c, _ in results if not is_right(s, c) and not (s >= 500 and c)]
    assert wrong == [], wrong  # every request answered right, or a 5xx with a body: none hung, none wrong
    assert right / len(results) > 0.9, (right, len(results))
    deadline = killed + 60
    while len(_replicas(cluster, "net")) < 2 or victim["actor_id"] in {r["actor_id"] for r in _replicas(cluster, "net")}:
        assert time.monotonic() < deadline, "no replacement replica within 60 s"
        time.sleep(0.5)
    back = time.monotonic() - killed
    assert is_right(*(lambda r: (r.status_code, r.content))(_post(cluster, "/predictions/net", body, "application/json")))
    print(f"ray: {len(results)} requests, {right} right, {len(results) - right} 5xx; a replacement replica alive {back:.1f} s after the kill")


def test_the_handlers_counters_reach_rays_metrics_agent(cluster: Cluster) -> None:
    body = json.dumps({"inputs": ROWS[0].tolist()}).encode()
    for _ in range(5):
        assert _post(cluster, "/predictions/net", body, "application/json").status_code == 200
    deadline = time.monotonic() + 60
    while True:  # the agents export every few seconds
        text = "".join(requests.get(url, timeout=10).text for url in cluster.metrics)
        batches = [line for line in text.splitlines() if line.startswith("ray_serveready_batches") and 'model="net"' in line]
        if batches and sum(float(line.rsplit(" ", 1)[1]) for line in batches) >= 5:
            break
        assert time.monotonic() < deadline, [line for line in text.splitlines() if "serveready" in line][:20]
        time.sleep(2)
    assert any(line.startswith("ray_serveready_stage_ms") and 'Stage="inference"' in line for line in text.splitlines())
