"""The handlers' own metrics: counted per batch, handed to the host at most once a second.

Counters only, named as Prometheus names counters, so any query can make rates and means of them (ms per batch:
``rate(serveready_stage_ms_total{Stage="inference"}[1m]) / rate(serveready_batches_total[1m])``):

    serveready_batches_total                   batches handled
    serveready_rows_total                      model input rows (rows per batch: / batches)
    serveready_stage_ms_total{Stage}            milliseconds in preprocess, inference, postprocess
    serveready_refused_total{Status, Error}    requests answered 4xx/5xx by the handler, by error type

A TorchServe worker hands every metric to its frontend as a line on stdout, which the Java
frontend parses: five lines per batch cost the worker ~35 us and the frontend more per request
(measured on ``net``). So the worker adds each batch to running totals and hands TorchServe
the increments at most once per :data:`FLUSH_SECONDS` (a timer flushes what a last batch
left). In Prometheus mode with ``model_metrics_auto_detect=true`` (``ts-server start`` sets
both) they appear at the metrics endpoint; in log mode they are lines in its metrics log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

BATCHES = "serveready_batches_total"
ROWS = "serveready_rows_total"
STAGE_MS = "serveready_stage_ms_total"
REFUSED = "serveready_refused_total"
#: the longest a counted batch waits before its counts reach the host
FLUSH_SECONDS = 1.0

logger = logging.getLogger(__name__)


@dataclass
class BatchStats:
    """What one batch (or, summed, many) did."""

    batches: int = 1
    rows: int = 0
    stage_ms: dict[str, float] = field(default_factory=dict)
    refused: Counter = field(default_factory=Counter)  # (status, error type) -> requests

    def timed(self, stage: str, began: float) -> None:
        """Add the milliseconds since ``began`` (a perf_counter reading) to ``stage``."""
        self.stage_ms[stage] = self.stage_ms.get(stage, 0.0) + (time.perf_counter() - began) * 1e3

    def add(self, other: BatchStats) -> None:
        self.batches += other.batches
        self.rows += other.rows
        stage_ms = self.stage_ms
        for stage, ms in other.stage_ms.items():
            stage_ms[stage] = stage_ms.get(stage, 0.0) + ms
        if other.refused:  # Counter.update is slow even when empty, and most batches refuse nothing
            self.refused.update(other.refused)

    def as_dict(self) -> dict[str, Any]:
        """The totals by their Prometheus names (``refused`` keyed ``"status error"``)."""
        return {BATCHES: self.batches, ROWS: self.rows, STAGE_MS: dict(self.stage_ms),
                REFUSED: {f"{status} {error}": count for (status, error), count in self.refused.items()}}


class Totals:
    """Running totals of every batch, safe to add to from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = BatchStats(batches=0)

    def add(self, stats: BatchStats) -> None:
        with self._lock:
            self._stats.add(stats)

    def take(self) -> BatchStats:
        """What was added since the last take, and start again from zero."""
        with self._lock:
            taken, self._stats = self._stats, BatchStats(batches=0)
        return taken

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._stats.as_dict()


class TorchServeMetrics:
    """Hands the counts to a TorchServe worker's metrics cache, at most once per ``every`` seconds."""

    def __init__(self, context: Any, every: float = FLUSH_SECONDS) -> None:
        self._context = context
        self._every = every
        self._pending = Totals()
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def add(self, stats: BatchStats) -> None:
        self._pending.add(stats)
        if self._every <= 0:
            self.flush()
            return
        with self._lock:
            if self._timer is None:
                self._timer = threading.Timer(self._every, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Emit what is pending now (the timer calls this)."""
        with self._lock:
            self._timer = None
        stats = self._pending.take()
        if stats.batches:
            emit(self._context, stats)


def emit(context: Any, stats: BatchStats) -> None:
    """Hand ``stats`` to TorchServe's metrics cache; nothing without one."""
    cache = getattr(context, "metrics", None)
    if cache is None:
        return
    try:
        from ts.metrics.dimension import Dimension
    except ImportError:  # pragma: no cover - TorchServe's workers always have ts
        return
    model = str(getattr(context, "model_name", "") or "")

    def dims(**extra: str) -> list[Any]:
        # A new list each call: TorchServe appends its default dimensions to the list it is given.
        return [Dimension("ModelName", model), Dimension("Level", "Model"), *(Dimension(k, v) for k, v in extra.items())]

    try:
        cache.add_counter(BATCHES, stats.batches, dimensions=dims())
        cache.add_counter(ROWS, stats.rows, dimensions=dims())
        for stage, ms in stats.stage_ms.items():
            cache.add_counter(STAGE_MS, round(ms, 3), dimensions=dims(Stage=stage))
        for (status, error), count in stats.refused.items():
            cache.add_counter(REFUSED, count, dimensions=dims(Status=str(status), Error=error))
    except Exception:  # a metric must never fail a batch that was answered
        logger.exception("could not record the handler's metrics")
