"""What every server other than TorchServe needs to host this library's archives the way TorchServe does.

KServe's model server (:mod:`serveready.kserve`) and Ray Serve (:mod:`serveready.ray`) each load an
archive with :func:`serveready.load` and hand it the request's bytes, content type and headers, so a
handler answers there exactly what it answers on TorchServe: same bodies, same statuses, same
messages. What a host adds around the model is here, written once:

- :func:`archives`: the ``.mar`` files of a model store, by the name they serve under;
- :func:`route`: which model and verb a request path names (TorchServe's ``/predictions``,
  ``/explanations``, KServe v1 ``:predict``/``:explain``, v2 ``/infer``);
- :class:`Batcher`: requests that arrive together run as one batch, up to the archive's batch
  size, and a lone request never waits for company;
- :func:`metadata`: the v2 model metadata TorchServe never had, from one sample request;
- the limits (:data:`MAX_BODY`, :func:`key_matches`) and the errors TorchServe's frontend
  writes (:func:`frontend_error`);
- :class:`MetricsCollector`: the handler's counters as Prometheus metrics, per model.

Only the library's handler core and the standard library (``prometheus_client`` inside the
collector): a host module imports what its engine needs itself.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .handlers.archive import store_archives
from .handlers.errors import ServereadyError
from .handlers.host import Answer, Model, frontend_error

#: The address a host listens on unless told otherwise: this machine only.
DEFAULT_HOST = "127.0.0.1"
#: The largest request body, as ``ts-server`` configures TorchServe (``max_request_size``): larger ones get 413.
MAX_BODY = 8 * 2**20
#: What the verbs are called in routes
PREDICT, EXPLAIN = "predict", "explain"

logger = logging.getLogger("serveready.hosting")

_ROUTES = [
    (re.compile(r"^/predictions/(?P<name>[^/]+)(?:/(?P<version>[^/]+))?/?$"), PREDICT),
    (re.compile(r"^/explanations/(?P<name>[^/]+)(?:/(?P<version>[^/]+))?/?$"), EXPLAIN),
    (re.compile(r"^/v1/models/(?P<name>[^/:]+):predict$"), PREDICT),
    (re.compile(r"^/v1/models/(?P<name>[^/:]+):explain$"), EXPLAIN),
    (re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$"), PREDICT),
]


@dataclass(frozen=True)
class Route:
    """What a request path asks: a model (by its served name) and a verb."""

    model: str
    verb: str


def route(path: str) -> Route | None:
    """The model and verb ``path`` names, or None when it is not an inference route."""
    for pattern, verb in _ROUTES:
        found = pattern.match(path)
        if found:
            return Route(found["name"], verb)
    return None


#: the ``.mar`` files of a model store by the name each serves under (:func:`serveready.handlers.archive.store_archives`)
archives = store_archives


#: routes anybody may call, key or not: probes and scrapers carry none (TorchServe's /ping does need it)
OPEN_PATHS = ("/", "/metrics", "/v2/health/live", "/v2/health/ready")


def is_open(path: str) -> bool:
    """Whether ``path`` is a health, readiness or metrics route (no key needed)."""
    return (path in OPEN_PATHS or (path.startswith("/v2/models/") and path.endswith("/ready"))
            or (path.startswith("/v1/models/") and ":" not in path))


def key_matches(headers: Mapping[str, str], key: str | None) -> bool:
    """Whether the request carries ``Authorization: Bearer <key>`` (always, when no key is set)."""
    if not key:
        return True
    given = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    scheme, _, token = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def unauthorized() -> Answer:
    """TorchServe's answer to a missing or wrong key."""
    return _error(401, "Token Authorization failed. Token either incorrect, expired, or not provided correctly", "InvalidKeyException")


def too_large(size: int | None, limit: int = MAX_BODY) -> Answer:
    """The answer to a body over ``limit`` bytes (``size`` None: a streamed body that passed it)."""
    said = f"{size:,} bytes" if size is not None else "more bytes"
    return _error(413, f"the request body holds {said}, more than the limit of {limit:,} bytes (max_request_size)", "RequestTooLarge")


def model_not_found(name: str) -> Answer:
    """TorchServe's answer for a model it does not serve."""
    return _error(404, f"Model not found: {name}", "ModelNotFoundException")


def _error(status: int, message: str, kind: str = "InternalServerException") -> Answer:
    """An error in the shape of TorchServe's frontend's (``{"code", "type", "message"}``, pretty-printed)."""
    body = json.dumps({"code": status, "type": kind, "message": message}, indent=2, ensure_ascii=False) + "\n"
    return Answer(status, "application/json", body.encode(), message)


class Batcher:
    """One model's requests, answered in batches: whatever is queued when the model is free goes as one batch,
    up to ``size``. A lone request runs at once; requests that arrive while a batch runs form the next one,
    so a crowd gets full batches without anybody waiting a fixed delay (TorchServe 0.12 cannot do this with
    ``maxBatchDelay: 0``). The model runs on one thread of its own, off the event loop."""

    def __init__(self, model: Model, size: int) -> None:
        self.model = model
        self.size = max(1, size)
        self._queue: list[tuple[tuple[bytes, str | None, dict[str, str]], asyncio.Future]] = []
        self._running = False
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"serveready-{model.name}")

    async def predict(self, body: bytes, content_type: str | None, headers: Mapping[str, str]) -> Answer:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._queue.append(((body, content_type, dict(headers)), future))
        if not self._running:
            self._running = True
            self._task = loop.create_task(self._drain())  # kept: the loop holds tasks only weakly
        return await future

    async def explain(self, body: bytes, content_type: str | None, headers: Mapping[str, str]) -> Answer:
        """An explanation, alone (it runs the model many times)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.model.explain, body, content_type, dict(headers))

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch, self._queue = self._queue[: self.size], self._queue[self.size:]
                try:
                    answers = await loop.run_in_executor(self._pool, self.model.predict_batch, [request for request, _ in batch])
                except Exception as err:  # noqa: BLE001 - the batch's requests get the error, the batcher lives on
                    logger.exception("%s: a batch of %d failed", self.model.name, len(batch))
                    answers = [frontend_error(500, f"the model failed: {err}")] * len(batch)
                for (_, future), answer in zip(batch, answers, strict=True):
                    if not future.done():
                        future.set_result(answer)
        finally:
            self._running = False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.model.close()


def sample_request(model: Model) -> bytes:
    """A v2 JSON request of one sample input (the handler's own), for warming up and for :func:`metadata`."""
    value = model.handler.sample_instance(0)
    if isinstance(value, (bytes, bytearray)):
        value = base64.b64encode(bytes(value)).decode()
    if isinstance(value, str):
        spec: dict[str, Any] = {"name": "input", "shape": [1], "datatype": "BYTES", "data": [value]}
    else:
        spec = {"name": "input", "shape": _shape([value]), "datatype": "FP32", "data": _flatten([value])}
    return json.dumps({"inputs": [spec]}).encode()


def metadata(model: Model) -> dict[str, Any]:
    """v2 model metadata: the input (BYTES for files and texts, FP32 rows for numbers; any name is taken) and
    the outputs one sample request answers, their first dimension variable (-1)."""
    request = json.loads(sample_request(model))["inputs"][0]
    answer = model.predict(json.dumps({"inputs": [request]}).encode(), "application/json")
    outputs = answer.json().get("outputs", []) if answer.ok else []
    return {
        "name": model.name,
        "versions": [model.version] if model.version else [],
        "platform": f"serveready_{model.archive.config.get('model', {}).get('format', 'torch')}",
        "inputs": [{"name": request["name"], "datatype": request["datatype"], "shape": [-1, *request["shape"][1:]]}],
        "outputs": [{"name": o["name"], "datatype": o["datatype"], "shape": [-1, *o["shape"][1:]]} for o in outputs],
    }


def _flatten(rows: Any) -> list[float]:
    return [x for row in rows for x in (_flatten(row) if isinstance(row, list) else [row])] if isinstance(rows, list) else [rows]


def _shape(rows: Any) -> list[int]:
    shape = []
    while isinstance(rows, list):
        shape.append(len(rows))
        rows = rows[0] if rows else None
    return shape


class MetricsCollector:
    """The handler's counters (``serveready_*``, see :mod:`serveready.handlers.observe`) as Prometheus metrics
    with a ``model`` label, read from each model when scraped."""

    def __init__(self, models: Mapping[str, Model]) -> None:
        self.models = models

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        batches = CounterMetricFamily("serveready_batches", "batches handled", labels=["model"])
        rows = CounterMetricFamily("serveready_rows", "model input rows", labels=["model"])
        stages = CounterMetricFamily("serveready_stage_ms", "milliseconds per stage", labels=["model", "Stage"])
        refused = CounterMetricFamily("serveready_refused", "requests answered 4xx/5xx by the handler", labels=["model", "Status", "Error"])
        for name, model in self.models.items():
            totals = model.metrics()
            batches.add_metric([name], totals["serveready_batches_total"])
            rows.add_metric([name], totals["serveready_rows_total"])
            for stage, ms in totals["serveready_stage_ms_total"].items():
                stages.add_metric([name, stage], ms)
            for key, count in totals["serveready_refused_total"].items():
                status, _, error = key.partition(" ")
                refused.add_metric([name, status, error], count)
        yield from (batches, rows, stages, refused)


def log_runs_with(model: Model, host: str) -> None:
    """The worker's one-line report, in the host's log."""
    logger.info("%s on %s: %s runs with %s (batch size %d)", model.name, host, model.archive.path.name, model.runs_with, model.archive.batch_size)


__all__ = ["EXPLAIN", "MAX_BODY", "OPEN_PATHS", "PREDICT", "Batcher", "ServereadyError", "MetricsCollector", "Route", "archives", "is_open", "key_matches",
           "log_runs_with", "metadata", "model_not_found", "route", "sample_request", "too_large", "unauthorized"]
