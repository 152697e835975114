"""The TorchServe host: the class an archive's entry module defines, adapting a worker to the engine.

An archive's generated ``serveready_entry.py`` holds exactly one class, a subclass of
:class:`TorchServeEntry` naming the handler class; TorchServe instantiates it and calls
``initialize(context)`` once and ``handle(batch, context)`` per batch. This module turns
TorchServe's context into a :class:`~.engine.ModelSource`, its request dicts and headers into
:class:`~.payload.Request`, and the engine's replies back into what TorchServe sends: per
request status and content type set on the context, bodies as compact JSON bytes (TorchServe
would encode a dict itself with ``json.dumps(indent=2)``, the pure-Python encoder).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from .base import BatchHandler
from .engine import BatchFailed, Engine, ModelSource
from .observe import BatchStats, TorchServeMetrics
from .payload import Request

#: TorchServe marks requests to /explanations/<model> (and v1 :explain) with this request header.
EXPLAIN_HEADER = "explain"
# TorchServe's worker logs this on every batch it reads (ts/protocol/otf_message_handler.py):
# a line to format, write to stdout, and for the Java frontend to read and log again.
_PER_BATCH_MESSAGE = "Backend received inference at: %d"


class TorchServeEntry:
    """A TorchServe handler serving ``handler_class`` through the engine."""

    handler_class: ClassVar[type[BatchHandler]] = BatchHandler

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.metrics: TorchServeMetrics | None = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        """Validate the archive's config, pick device and threads, load and warm up the model."""
        properties = context.system_properties
        source = ModelSource(
            model_dir=Path(properties["model_dir"]),
            manifest=context.manifest or {},
            config=dict(context.model_yaml_config or {}),
            name=str(getattr(context, "model_name", "") or ""),
            gpu_id=properties.get("gpu_id"),
            batch_size=int(properties.get("batch_size") or 1),
        )
        self.engine = Engine(self.handler_class, source)
        if in_worker_process():
            # The process serves this one model: autograd off for good saves a context per batch
            # (explanations turn it on for themselves). Not when a test or a tool runs this class in-process.
            torch.set_grad_enabled(False)
        quiet_per_batch_log()
        self.metrics = TorchServeMetrics(context) if self.engine.options.metrics else None
        self.initialized = True

    def handle(self, data: Sequence[Mapping[str, Any]], context: Any) -> list[Any]:
        """TorchServe's entry point: exactly one answer per request, in order."""
        assert self.engine is not None, "initialize() was not called"
        stats = BatchStats()
        requests = [Request(fields, RequestHeaders(context, idx), _explain_asked(context, idx)) for idx, fields in enumerate(data)]
        try:
            replies = self.engine.answer(requests, stats)
        except BatchFailed as err:
            raise _prediction_error(err.message, err.status) from err
        began = time.perf_counter()
        answers: list[Any] = []
        for idx, reply in enumerate(replies):
            if reply.error is not None:
                context.set_response_status(reply.status, reply.error.message, idx)
            body = reply.body
            if isinstance(body, (dict, list)):
                body = json.dumps(body, separators=(",", ":")).encode()
                context.set_response_content_type(idx, "application/json")
            answers.append(body)
        stats.timed("postprocess", began)
        if self.metrics is not None:
            self.metrics.add(stats)
        return answers


class RequestHeaders(Mapping[str, str]):
    """One request's HTTP headers, names lower-cased, read from the context only when a handler asks."""

    def __init__(self, context: Any, idx: int) -> None:
        self._context, self._idx = context, idx
        self._found: dict[str, str] | None = None

    def _all(self) -> dict[str, str]:
        if self._found is None:
            try:
                found = self._context.get_all_request_header(self._idx)
            except (AttributeError, IndexError, TypeError):  # no TorchServe request data
                found = {}
            self._found = {str(k).lower(): v for k, v in found.items() if isinstance(v, str)}
        return self._found

    def __getitem__(self, name: str) -> str:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def in_worker_process() -> bool:
    """True in a TorchServe worker process (its main module is ts/model_service_worker.py)."""
    main = sys.modules.get("__main__")
    return str(getattr(main, "__file__", "") or "").endswith("model_service_worker.py")


def _explain_asked(context: Any, idx: int) -> bool:
    # TorchServe's /explanations route sets this header itself (lower-case): one lookup, not a header copy.
    try:
        return context.get_request_header(idx, EXPLAIN_HEADER) == "True"
    except (AttributeError, IndexError, TypeError, KeyError):
        return False


def _not_per_batch(record: logging.LogRecord) -> bool:
    return record.msg != _PER_BATCH_MESSAGE


def quiet_per_batch_log() -> None:
    """Drop TorchServe's one INFO line per batch from this worker's log (it carries only a timestamp)."""
    root = logging.getLogger()
    if _not_per_batch not in root.filters:
        root.addFilter(_not_per_batch)


def _prediction_error(message: str, code: int) -> Exception:
    # TorchServe's own exception gives its code to the whole batch.
    from ts.utils.util import PredictionException

    return PredictionException(message, code)
