"""``ts-server``'s no-wait aggregator (scripts/batching.py) on a real TorchServe, against TorchServe's own.

The same archive, registered with ``batchSize 16, maxBatchDelay 0`` on one worker, asked by 32
clients at once: TorchServe 0.12's own aggregator never batches more than 2; the patched one takes
what is queued. Every answer is checked against the model's own numbers, and a lone client's
requests run alone (batches of one: nothing waited for company).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from serveready.scripts.client import Management
from serveready.scripts.runinfo import RunDir, TokenKind
from serveready.scripts.server import isolated, start, stop
from tests.conftest import reference_net
from tests.e2e.conftest import Api

CLIENTS, EACH = 32, 25


def _counters(run: RunDir, model: str, rows: int) -> tuple[float, float]:
    """serveready_rows_total and serveready_batches_total of ``model``, once ``rows`` rows were counted."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + 30
    while True:  # the worker flushes its counters once a second
        text = requests.get(f"{run.properties()['metrics_address']}/metrics", timeout=10).text
        found = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
                 if s.name in ("serveready_rows_total", "serveready_batches_total") and s.labels.get("ModelName") == model}
        if found.get("serveready_rows_total", 0) >= rows or time.monotonic() > deadline:
            return found.get("serveready_rows_total", 0), found.get("serveready_batches_total", 0)
        time.sleep(0.5)


@pytest.mark.parametrize("mode", ["no-wait", "stock"])
def test_a_crowd_gets_full_batches_and_a_lone_client_runs_alone(mode: str, net_archive: Path, net_spec, tmp_path: Path) -> None:  # noqa: ANN001
    store = tmp_path / "model_store"
    store.mkdir()
    shutil.copy(net_archive, store / "net.mar")
    run = start(dataclasses.replace(isolated(tmp_path / "run", store), batching=mode))
    try:
        assert run.batching.startswith(mode), run.batching
        Management.from_run(run).register("net.mar", workers=1, batch_size=16, max_batch_delay=0)
        api = Api(run)
        rng = np.random.default_rng(7)
        rows = rng.normal(size=(CLIENTS * EACH, 10)).astype(np.float32)
        expected = reference_net(net_spec.weights, rows)

        for i in range(20):  # one client, one request at a time
            reply = api.predict("net", json.dumps({"inputs": rows[i].tolist()}))
            assert reply.status_code == 200, reply.text
        alone = _counters(run, "net", 20)
        assert alone == (20, 20)  # every lone request was its own batch

        key = run.token(TokenKind.INFERENCE)

        def client(k: int) -> list[tuple[int, list]]:
            answers = []
            with requests.Session() as session:
                for i in range(k * EACH, (k + 1) * EACH):
                    reply = session.post(f"{run.inference_url}/predictions/net", data=json.dumps({"inputs": rows[i].tolist()}),
                                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"}, timeout=60)
                    answers.append((reply.status_code, reply.json().get("predictions")))
            return answers

        with ThreadPoolExecutor(CLIENTS) as pool:
            answered = [a for part in pool.map(client, range(CLIENTS)) for a in part]
        assert all(status == 200 for status, _ in answered)
        np.testing.assert_allclose(np.array([p[0] for _, p in answered]), expected, rtol=1e-5, atol=1e-5)
        total_rows, total_batches = _counters(run, "net", 20 + CLIENTS * EACH)
        crowd = (total_rows - 20) / (total_batches - 20)
        print(f"{mode}: {CLIENTS} clients, {CLIENTS * EACH} requests in {total_batches - 20:.0f} batches: {crowd:.2f} rows a batch")
        if mode == "stock":
            assert crowd <= 2.0  # TorchServe 0.12's own: with delay 0, the first job and at most one more
        else:
            assert crowd > 3.0  # what was queued, up to 16
    finally:
        stop(run.path)
