"""Faults a real service meets, against a real TorchServe: workers killed under load, hours of traffic.

Each test asserts what the clients saw: every request answered (none hangs), each answer a
correct prediction or a clear 5xx, and with the library's client helper, no request lost.
The counts and recovery times are printed (pytest -s) for docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from serveready.handlers.archive import Archive
from serveready.scripts.client import Inference, Management, worker_gone
from serveready.scripts.loadgen import Load as WrkLoad
from serveready.scripts.loadgen import run_wrk
from serveready.scripts.runinfo import RunDir, TokenKind
from tests.conftest import reference_net
from tests.e2e.conftest import serving
from tests.e2e.test_serve import ts_manage
from tests.e2e.test_tune import _need_wrk

ROWS = np.random.default_rng(21).normal(size=(16, 10)).astype(np.float32)
#: SIGKILLs per fault test (reliability.md's probes ran 20 and more).
KILLS = 6
#: A request never answered within this many seconds counts as hung (TorchServe never answers those).
HUNG_AFTER = 30.0


@pytest.fixture(scope="module")
def faults(net_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunDir]:
    with serving([net_archive], tmp_path_factory.mktemp("faults")) as run:
        assert ts_manage(run, "register", "net.mar").returncode == 0  # the shipped config: 2 workers, batch 2, delay 0
        assert ts_manage(run, "register", "net.mar", "--name", "net_one", "--workers", "1").returncode == 0
        yield run


@dataclass
class Seen:
    statuses: Counter = field(default_factory=Counter)
    wrong: int = 0
    hung: int = 0
    bodies: Counter = field(default_factory=Counter)
    #: right answers by which of the expected outputs they matched
    matched: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + self.hung


class Load:
    """``clients`` threads sending single rows of ROWS until stopped; every answer checked against ``expected``.

    ``expected``: the outputs for ROWS; several when any of them is right (before and after a rollout).
    """

    def __init__(self, run: RunDir, model: str, clients: int, expected: Sequence[np.ndarray], helper: bool) -> None:
        self.run, self.model, self.expected, self.helper = run, model, expected, helper
        self.seen = Seen()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(HUNG_AFTER + 10)

    def _client(self, index: int) -> None:
        api = Inference.from_run(self.run, timeout=HUNG_AFTER)
        session = requests.Session()
        headers = api.headers("application/json")
        i = index
        while not self.stop.is_set():
            row = i % len(ROWS)
            body = json.dumps({"inputs": ROWS[row].tolist()}).encode()
            i += 1
            try:
                if self.helper:
                    reply = api.post(self.model, body, "application/json")
                else:
                    reply = session.post(f"{api.url}/predictions/{self.model}", data=body, headers=headers, timeout=HUNG_AFTER)
            except (requests.Timeout, Exception) as err:  # a ScriptError from the helper wraps the timeout
                if "did not answer" in str(err) or isinstance(err, requests.Timeout):
                    with self.lock:
                        self.seen.hung += 1
                    continue
                raise
            with self.lock:
                self.seen.statuses[reply.status_code] += 1
                if reply.status_code == 200:
                    got = np.array(reply.json()["predictions"][0])
                    match = next((k for k, outputs in enumerate(self.expected) if np.abs(got - outputs[row]).max() <= 1e-4), None)
                    if match is None:
                        self.seen.wrong += 1
                    else:
                        self.seen.matched[match] += 1
                else:
                    self.seen.bodies[f"{reply.status_code} {reply.text[:80]}"] += 1


def _ready_pids(management: Management, name: str) -> list[int]:
    workers = management.describe(name)[0]["workers"]
    return [int(w["pid"]) for w in workers if w["status"] == "READY"]


def kill_workers(run: RunDir, name: str, kills: int, workers: int) -> list[float]:
    """SIGKILL one READY worker ``kills`` times, each after all ``workers`` are READY again; seconds to recover."""
    management = Management.from_run(run)
    recoveries = []
    for _ in range(kills):
        deadline = time.monotonic() + 60
        while len(pids := _ready_pids(management, name)) < workers:
            assert time.monotonic() < deadline, f"{name}: workers not READY again within 60s"
            time.sleep(0.05)
        time.sleep(0.3)  # requests in flight
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        began = time.monotonic()
        # READY again: as many workers as before, the killed one not among them
        while len(pids := _ready_pids(management, name)) < workers or victim in pids:
            assert time.monotonic() < began + 60, f"{name}: no new worker READY within 60s"
            time.sleep(0.02)
        recoveries.append(time.monotonic() - began)
    return recoveries


@pytest.mark.parametrize(("model", "workers"), [("net", 2), ("net_one", 1)])
def test_workers_killed_under_load_every_request_is_answered(faults: RunDir, net_spec, model: str, workers: int) -> None:  # noqa: ANN001
    expected = reference_net(net_spec.weights, ROWS)
    with Load(faults, model, 8, [expected], helper=False) as load:
        time.sleep(1)
        recoveries = kill_workers(faults, model, KILLS, workers)
        time.sleep(1)
    seen = load.seen
    print(f"\n{model} ({workers} worker(s)), {KILLS} SIGKILLs under 8 clients: {seen.total} requests, statuses {dict(seen.statuses)}, "
          f"hung {seen.hung}, wrong {seen.wrong}; recovery {min(recoveries):.2f}-{max(recoveries):.2f}s; {dict(seen.bodies)}")
    assert seen.hung == 0, "requests never answered"
    assert seen.wrong == 0
    assert seen.statuses[200] > 0
    failed = {status for status in seen.statuses if status != 200}
    assert failed <= {413, 500, 503, 507}, seen.bodies
    assert all("Worker died" in b or b.startswith("503") for b in seen.bodies), seen.bodies


def test_with_the_client_helper_no_prediction_is_lost(faults: RunDir, net_spec) -> None:  # noqa: ANN001
    expected = reference_net(net_spec.weights, ROWS)
    with Load(faults, "net_one", 8, [expected], helper=True) as load:
        time.sleep(1)
        kill_workers(faults, "net_one", KILLS, 1)
        time.sleep(1)
    seen = load.seen
    print(f"\nnet_one with Inference.post's retries, {KILLS} SIGKILLs: {seen.total} requests, statuses {dict(seen.statuses)}, hung {seen.hung}")
    assert seen.hung == 0 and seen.wrong == 0
    assert set(seen.statuses) == {200}, seen.bodies


def test_worker_gone_recognises_torchserves_answers() -> None:
    def reply(status: int, text: str) -> requests.Response:
        r = requests.Response()
        r.status_code, r._content = status, text.encode()
        return r

    assert worker_gone(reply(507, '{"code": 507, "type": "InternalServerException", "message": "Worker died."}'))
    assert worker_gone(reply(503, '{"message": "Model \\"net\\" has no worker to serve inference request."}'))
    assert not worker_gone(reply(500, '{"code": 500, "message": "inference failed: internal error, see the model log"}'))
    assert not worker_gone(reply(400, '{"message": "row 0 has 2 values, expected 10"}'))


def test_sustained_load_is_all_correct_and_memory_stays_flat(faults: RunDir, net_spec) -> None:  # noqa: ANN001
    """30 s at 32 clients against the batched model; worker RSS before and after (reliability.md has a 60 s run)."""
    expected = reference_net(net_spec.weights, ROWS)
    management = Management.from_run(faults)
    pids = _ready_pids(management, "net")
    with Load(faults, "net", 32, [expected], helper=False) as load:
        time.sleep(5)
        before = sum(psutil.Process(p).memory_info().rss for p in pids)
        time.sleep(25)
        after = sum(psutil.Process(p).memory_info().rss for p in pids)
    seen = load.seen
    print(f"\nsustained: 30 s x 32 clients: {seen.total} requests ({seen.total / 30:.0f}/s), statuses {dict(seen.statuses)}, "
          f"worker RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    assert set(seen.statuses) == {200} and seen.hung == 0 and seen.wrong == 0
    assert _ready_pids(management, "net") == pids, "a worker was replaced"
    assert after - before < 64 * 2**20, f"worker RSS grew {(after - before) / 2**20:.0f} MiB in 25 s"


def test_a_burst_beyond_torchserves_own_queue_gets_no_503(net_archive: Path, tmp_path: Path) -> None:
    """256 clients at once: the archive's queue of 1000 answers all; TorchServe's own 100 turns most away with 503."""
    _need_wrk()
    stock = Archive(net_archive).rewrite(tmp_path / "net_q100.mar", lambda config: config.update(jobQueueSize=100)).path
    body = tmp_path / "row.json"
    body.write_text(json.dumps({"inputs": ROWS[0].tolist()}))
    results = {}
    (tmp_path / "burst").mkdir()
    with serving([net_archive, stock], tmp_path / "burst") as run:
        management = Management.from_run(run)
        for archive in ("net.mar", "net_q100.mar"):
            management.register(archive)
        for model in ("net", "net_q100"):
            load = WrkLoad(f"{run.inference_url}/predictions/{model}", body, "application/json", run.token(TokenKind.INFERENCE))
            results[model] = run_wrk(load, 256, 4.0, timeout_s=30.0)
            print(f"\n{model}: 256 clients, {results[model].requests} requests, {results[model].errors} not 200, {results[model].rps:,.0f} req/s")
    assert results["net"].requests > 0 and results["net"].errors == 0
    assert results["net_q100"].errors > 0  # what the default of 1000 is for
