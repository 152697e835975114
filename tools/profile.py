"""Where one batch's time goes inside a worker (``tools.bench`` runs it before the HTTP part).

The archive is loaded the way a worker loads it (``ts.model_loader.TsModelLoader``, TorchServe's
metrics cache) and fed batches in the worker protocol's form through ``Service.predict``, so the
numbers include TorchServe's own Python (request unpacking, metrics, response framing) as well as
the handler's stages: decode, inference, encode, and the JSON bytes ``handle`` returns.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
import zipfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGES = ("decode", "inference", "encode", "json")


@dataclass(frozen=True)
class StageProfile:
    """Microseconds per batch: TorchServe's ``predict`` in all, and the handler's stages inside it."""

    batch: int
    predict_us: float
    stages_us: dict[str, float]

    @property
    def torchserve_us(self) -> float:
        """TorchServe's Python around the handler (unpacking, metrics, response framing)."""
        return self.predict_us - sum(self.stages_us.values())


def _timed(totals: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        begin = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - begin

    return wrapper


class _TimedPool:
    """An engine's decoding pool whose ``map`` is timed as a whole: a batch's requests decoded side by side
    take the wall time of the slowest thread, not the sum of the threads' times."""

    def __init__(self, pool: Any, totals: dict[str, float]) -> None:
        self._pool = pool
        self.map = _timed(totals, "decode", lambda fn, *iterables: list(pool.map(fn, *iterables)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def _time_decoding(engine: Any, totals: dict[str, float]) -> None:
    """Time the decode stage of ``engine``'s batches as the batch's wall time: requests decoded one after another
    (``engine._decode`` on the calling thread), or side by side (the pool of ``BatchHandler.heavy_decode``)."""
    caller = threading.get_ident()
    decode = engine._decode
    timed = _timed(totals, "decode", decode)
    # on a pool thread the pool's map is timed instead
    engine._decode = lambda *args: timed(*args) if threading.get_ident() == caller else decode(*args)
    if getattr(engine, "_decoders", None) is not None:
        engine._decoders = _TimedPool(engine._decoders, totals)


def _message(body: bytes, content_type: str, batch: int) -> list[dict[str, Any]]:
    """A batch as the worker's protocol decoder hands it to ``Service.predict`` (JSON already parsed)."""
    import json

    value: Any = json.loads(body) if content_type == "application/json" else body
    headers = [{"name": b"Content-Type", "value": content_type.encode()}, {"name": b"Authorization", "value": b"Bearer x"}]
    return [{"requestId": f"r{i}".encode(), "parameters": [{"name": "body", "contentType": content_type, "value": value}], "headers": headers}
            for i in range(batch)]


def profile_archive(archive: Path, body: bytes, content_type: str, batches: tuple[int, ...] = (1, 8), seconds: float = 1.0) -> list[StageProfile]:
    """Stage times per batch size for one archive, loaded as a worker loads it."""
    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import TsModelLoader

    with tempfile.TemporaryDirectory(prefix="ts-profile-") as tmp:
        with zipfile.ZipFile(archive) as mar:
            mar.extractall(tmp)
        metrics = MetricsCacheYamlImpl(config_file_path=os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml"))
        metrics.initialize_cache()
        metrics.model_name = archive.stem
        sys.path.insert(0, tmp)  # as TorchServe puts the model dir on the worker's path
        sys.modules.pop("serveready_entry", None)  # another archive's
        try:
            service = TsModelLoader().load(archive.stem, tmp, "serveready_entry.py", None, max(batches), None, True, metrics)
        finally:
            sys.path.remove(tmp)
        service.set_cl_socket(None)
        engine = service._entry_point.__self__.engine  # the archive's TorchServeEntry and its engine
        handler = engine.handler
        totals: dict[str, float] = defaultdict(float)
        _time_decoding(engine, totals)
        engine.inference = _timed(totals, "inference", engine.inference)
        handler.encode = _timed(totals, "encode", handler.encode)
        engine.answer = _timed(totals, "answers", engine.answer)
        service._entry_point = _timed(totals, "handle", service._entry_point)
        found = []
        for batch in batches:
            message = _message(body, content_type, batch)
            for _ in range(20):
                service.predict(message)
            totals.clear()
            count, begin = 0, time.perf_counter()
            while time.perf_counter() - begin < seconds:
                service.predict(message)
                count += 1
            predict = (time.perf_counter() - begin) / count * 1e6
            per = {k: v / count * 1e6 for k, v in totals.items()}
            stages = {"decode": per["decode"], "inference": per["inference"], "encode": per["encode"], "json": per["handle"] - per["answers"]}
            # what the handler spent outside the named stages (batching, error bookkeeping) counts as "encode"'s neighbour:
            stages["handler other"] = per["handle"] - sum(stages.values())
            found.append(StageProfile(batch, predict, stages))
    return found


def profile_table(name: str, profiles: list[StageProfile]) -> str:
    """A Markdown table: µs per batch and per request for each stage."""
    columns = [*STAGES, "handler other"]
    rows = [f"| `{name}` batch | TorchServe `predict` µs | " + " | ".join(columns) + " | TorchServe's own | per request µs |",
            "|---:|---:|" + "---:|" * len(columns) + "---:|---:|"]
    for p in profiles:
        rows.append(f"| {p.batch} | {p.predict_us:,.0f} | " + " | ".join(f"{p.stages_us[c]:,.0f}" for c in columns)
                    + f" | {p.torchserve_us:,.0f} | {p.predict_us / p.batch:,.0f} |")
    return "\n".join(rows)
