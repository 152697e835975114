"""A model store as a Ray Serve application: one deployment per archive, TorchServe's routes at ``/``.

    serve run serveready.ray:app store=model_store                # Ray's own CLI (this module's ``app`` builder)
    serve deploy serve_config.yaml                                # a config ``ts-archive ray`` writes

Each deployment is named after its archive; its replicas load it with :func:`serveready.load` (sums,
and a signature with ``public_key=``, checked first) and batch with ``@serve.batch`` up to the
archive's batch size, with no wait (``batch_wait_timeout_s=0``: what is queued when a replica is
free goes, a lone request goes at once). Replicas come from the archive's ``serve:`` section:
``minWorkers == maxWorkers`` is ``num_replicas``, otherwise an autoscaling range. Each replica
reserves ``num_cpus`` (default 0.25, so a store of small models fits a laptop; give 1 or more
for models that compute) and, for archives built for a GPU, one GPU (``num_gpus=`` to share).

The ingress deployment answers TorchServe's own routes with TorchServe's bodies (``POST
/predictions/NAME``, ``/explanations/NAME``, ``GET /ping``), KServe v1 (``:predict``,
``:explain``) and Open Inference Protocol v2 (``/infer``, JSON and binary), refuses bodies over
8 MiB (413) and, with ``key=`` (or ``SERVEREADY_KEY``), calls without the bearer key (401). A
prediction whose replica dies is sent again to another (predictions are idempotent): a replica
killed under load costs a few retries, not wrong or hung answers. Where Serve's HTTP proxy
listens is the caller's choice (``serve start --http-host``, or the config's ``http_options``);
this builder starts nothing.

Builder arguments (``serve run serveready.ray:app key=value ...``): ``store`` (required),
``models`` (comma-separated names), ``num_cpus``, ``num_gpus``, ``public_key``, ``key``,
``max_request_size``, ``retries`` (default 3).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

import serveready

from . import hosting
from .handlers.archive import Archive
from .handlers.errors import ConfigError

logger = logging.getLogger("serveready.ray")
KEY_ENV = "SERVEREADY_KEY"
#: what a replica reserves unless told otherwise
DEFAULT_CPUS = 0.25
#: how long a readiness probe waits for a replica of each model to answer
READY_TIMEOUT_S = 2.0
#: errors that mean "the replica went away", after which a prediction is sent again
_GONE = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError", "WorkerCrashedError",
         "BackPressureError", "DeploymentUnavailableError")


class RayMetrics:
    """The handler's counters through Ray's metrics agent (each node's Prometheus export, names prefixed ``ray_``),
    tagged with the model: what was added since the last update, after each batch."""

    def __init__(self, model: serveready.Model) -> None:
        from ray.util.metrics import Counter

        self.model, self.tags = model, {"model": model.name}
        self.batches = Counter("serveready_batches", "batches handled", tag_keys=("model",))
        self.rows = Counter("serveready_rows", "model input rows", tag_keys=("model",))
        self.stage_ms = Counter("serveready_stage_ms", "milliseconds per stage", tag_keys=("model", "Stage"))
        self.refused = Counter("serveready_refused", "requests answered 4xx/5xx by the handler", tag_keys=("model", "Status", "Error"))
        self._last: dict[str, Any] = model.metrics()

    def update(self) -> None:
        now = self.model.metrics()
        last, self._last = self._last, now
        for counter, key in ((self.batches, "serveready_batches_total"), (self.rows, "serveready_rows_total")):
            if now[key] > last[key]:
                counter.inc(now[key] - last[key], tags=self.tags)
        for stage, ms in now["serveready_stage_ms_total"].items():
            added = ms - last["serveready_stage_ms_total"].get(stage, 0.0)
            if added > 0:
                self.stage_ms.inc(added, tags={**self.tags, "Stage": stage})
        for key, count in now["serveready_refused_total"].items():
            added = count - last["serveready_refused_total"].get(key, 0)
            if added > 0:
                status, _, error = key.partition(" ")
                self.refused.inc(added, tags={**self.tags, "Status": status, "Error": error})


@serve.deployment(max_ongoing_requests=64)
class ArchiveReplica:
    """One archive in one replica."""

    def __init__(self, path: str, public_key: str | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        self.model = serveready.load(path, public_key=public_key)
        self.size = self.model.archive.batch_size
        self.answer_batch.set_max_batch_size(self.size)
        self._metadata = hosting.metadata(self.model)
        self._exported = RayMetrics(self.model)
        hosting.log_runs_with(self.model, f"Ray Serve (replica pid {os.getpid()})")

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def answer_batch(self, requests: list[tuple[bytes, str | None, dict[str, str]]]) -> list[tuple[int, str | None, bytes]]:
        loop = asyncio.get_running_loop()
        answers = await loop.run_in_executor(None, self.model.predict_batch, requests)
        self._exported.update()
        return [(a.status, a.content_type, a.body) for a in answers]

    async def predict(self, body: bytes, content_type: str | None, headers: dict[str, str]) -> tuple[int, str | None, bytes]:
        return await self.answer_batch((body, content_type, headers))

    async def explain(self, body: bytes, content_type: str | None, headers: dict[str, str]) -> tuple[int, str | None, bytes]:
        answer = await asyncio.get_running_loop().run_in_executor(None, self.model.explain, body, content_type, headers)
        return answer.status, answer.content_type, answer.body

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def metrics(self) -> dict[str, Any]:
        return self.model.metrics()


@serve.deployment(max_ongoing_requests=256)
class Ingress:
    """TorchServe's routes (and KServe v1, v2) in front of the archives' deployments."""

    def __init__(self, models: dict[str, DeploymentHandle], key: str | None, limit: int, retries: int) -> None:
        self.models, self.key, self.limit, self.retries = models, key, limit, retries

    async def __call__(self, request: Request) -> Response:
        headers = dict(request.headers)
        path = request.url.path
        if path == "/v2/health/live":
            return Response(status_code=200)
        if path == "/v2/health/ready":
            return Response(status_code=200 if await self._ready(list(self.models)) else 503)
        if not hosting.is_open(path) and not hosting.key_matches(headers, self.key):
            return _response(hosting.unauthorized())
        if path == "/ping":
            ready = await self._ready(list(self.models))
            return Response(json.dumps({"status": "Healthy" if ready else "Unhealthy"}, indent=2) + "\n", status_code=200 if ready else 500,
                            media_type="application/json")
        found = hosting.route(path) if request.method == "POST" else None
        if found is None:
            return await self._other(request, path)
        handle = self.models.get(found.model)
        if handle is None:
            return _response(hosting.model_not_found(found.model))
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return _response(hosting.too_large(int(declared), self.limit))
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limit:
                return _response(hosting.too_large(None, self.limit))
        method = handle.explain if found.verb == hosting.EXPLAIN else handle.predict
        status, content_type, data = await self._call(method, found.model, body, headers.get("content-type"), headers)
        return Response(data, status_code=status, media_type=content_type or "application/octet-stream")

    async def _call(self, method: Any, model: str, body: bytes, content_type: str | None, headers: dict[str, str]) -> tuple[int, str | None, bytes]:
        """The replica's answer; sent again (to another replica) when the one that had it went away."""
        for attempt in range(self.retries + 1):
            try:
                return await method.remote(body, content_type, headers)
            except Exception as err:  # noqa: BLE001 - only "the replica is gone" is retried
                if type(err).__name__ not in _GONE or attempt == self.retries:
                    logger.warning("%s: the request failed after %d attempt(s): %s", model, attempt + 1, err)
                    answer = hosting.frontend_error(503 if type(err).__name__ in _GONE else 500,
                                                    f"model {model}: {type(err).__name__}: the replica serving it failed; try again")
                    return answer.status, answer.content_type, answer.body
                logger.warning("%s: replica gone (%s), retrying (%d/%d)", model, type(err).__name__, attempt + 1, self.retries)
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _other(self, request: Request, path: str) -> Response:
        parts = path.strip("/").split("/")
        if request.method == "GET" and len(parts) >= 3 and parts[:2] == ["v2", "models"] and parts[2] in self.models:
            handle = self.models[parts[2]]
            if parts[3:] == ["ready"]:
                return Response(status_code=200 if await self._ready([parts[2]]) else 503)
            if len(parts) == 3:
                return Response(json.dumps(await handle.metadata.remote()), media_type="application/json")
        if request.method == "GET" and path == "/metrics":
            return Response(await self._metrics(), media_type="text/plain; version=0.0.4")
        return _response(hosting.frontend_error(404, f"no route {request.method} {path}"))

    async def _ready(self, names: list[str]) -> bool:
        """Ready means a replica of each model answers (within READY_TIMEOUT_S): a deployment whose replicas
        cannot be placed, or are still loading, is not ready, though Serve would queue its requests."""

        async def answers(name: str) -> bool:
            response = self.models[name].metadata.remote()
            try:
                await asyncio.wait_for(_awaited(response), READY_TIMEOUT_S)
                return True
            except asyncio.TimeoutError:
                response.cancel()
                return False
            except Exception:  # noqa: BLE001 - a replica that fails to answer is not ready, whatever it raised
                return False

        return all(await asyncio.gather(*(answers(n) for n in names)))

    async def _metrics(self) -> str:
        """The handler's counters of one replica per model (Ray's own metrics go through its metrics agent)."""
        lines = []
        for name, handle in self.models.items():
            totals = await handle.metrics.remote()
            lines.append(f'serveready_batches_total{{model="{name}"}} {totals["serveready_batches_total"]}')
            lines.append(f'serveready_rows_total{{model="{name}"}} {totals["serveready_rows_total"]}')
            for stage, ms in totals["serveready_stage_ms_total"].items():
                lines.append(f'serveready_stage_ms_total{{model="{name}",Stage="{stage}"}} {ms}')
        return "\n".join(lines) + "\n"


async def _awaited(response: Any) -> Any:
    return await response


def _response(answer: hosting.Answer) -> Response:
    return Response(answer.body, status_code=answer.status, media_type=answer.content_type or "application/octet-stream")


def replica_options(path: Path, num_cpus: float, num_gpus: float | None) -> dict[str, Any]:
    """A deployment's options from the archive's ``serve:`` settings (read without loading the model)."""
    archive = Archive(path)
    low, high = archive.workers
    gpus = num_gpus if num_gpus is not None else (1.0 if archive.device == "gpu" else 0.0)
    options: dict[str, Any] = {"name": path.stem, "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": gpus}}
    if low == high:
        options["num_replicas"] = low
    else:
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high}
    return options


def app(args: dict[str, Any]) -> Any:
    """The application builder: ``serve run serveready.ray:app store=model_store``."""
    if not args.get("store"):
        raise ConfigError("serveready.ray: give the model store: serve run serveready.ray:app store=model_store")
    names = [n for n in str(args.get("models") or "").split(",") if n]
    found = hosting.archives(args["store"], names)
    num_cpus = float(args.get("num_cpus", DEFAULT_CPUS))
    num_gpus = float(args["num_gpus"]) if args.get("num_gpus") not in (None, "") else None
    public_key = str(args["public_key"]) if args.get("public_key") else None
    handles = {name: ArchiveReplica.options(**replica_options(path, num_cpus, num_gpus)).bind(str(path.resolve()), public_key)
               for name, path in found.items()}
    key = str(args.get("key") or os.environ.get(KEY_ENV) or "") or None
    limit = int(args.get("max_request_size", hosting.MAX_BODY))
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(handles, key, limit, int(args.get("retries", 3)))


__all__ = ["ArchiveReplica", "Ingress", "app", "replica_options"]
