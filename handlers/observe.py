"""The handlers' own metrics, through TorchServe's metrics API.

Counters only, named as Prometheus names counters, so any query can make rates and means of them (ms per batch:
``rate(serveready_stage_ms_total{Stage="inference"}[1m]) / rate(serveready_batches_total[1m])``):

    serveready_batches_total                   batches handled
    serveready_rows_total                      model input rows (rows per batch: / batches)
    serveready_stage_ms_total{Stage}            milliseconds in preprocess, inference, postprocess
    serveready_refused_total{Status, Error}    requests answered 4xx/5xx by the handler, by error type

TorchServe's frontend exposes them at its metrics endpoint in Prometheus mode when
``model_metrics_auto_detect=true`` (``ts-server start`` sets both); elsewhere they are log lines.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

BATCHES = "serveready_batches_total"
ROWS = "serveready_rows_total"
STAGE_MS = "serveready_stage_ms_total"
REFUSED = "serveready_refused_total"

logger = logging.getLogger(__name__)


@dataclass
class BatchStats:
    """What one batch did, gathered while it is handled and emitted once at its end."""

    rows: int = 0
    stage_ms: dict[str, float] = field(default_factory=dict)
    refused: Counter = field(default_factory=Counter)  # (status, error type) -> requests

    def timed(self, stage: str, began: float) -> None:
        """Add the milliseconds since ``began`` (a perf_counter reading) to ``stage``."""
        self.stage_ms[stage] = self.stage_ms.get(stage, 0.0) + (time.perf_counter() - began) * 1e3


def emit(context: Any, stats: BatchStats) -> None:
    """Hand ``stats`` to TorchServe's metrics cache; nothing without one (plain in-process use)."""
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
        cache.add_counter(BATCHES, 1, dimensions=dims())
        cache.add_counter(ROWS, stats.rows, dimensions=dims())
        for stage, ms in stats.stage_ms.items():
            cache.add_counter(STAGE_MS, round(ms, 3), dimensions=dims(Stage=stage))
        for (status, error), count in stats.refused.items():
            cache.add_counter(REFUSED, count, dimensions=dims(Status=str(status), Error=error))
    except Exception:  # a metric must never fail a batch that was answered
        logger.exception("could not record the handler's metrics")
