"""The lifecycle every host shares: validate options, pick device and threads, load, batch, isolate bad requests, explain.

The engine knows neither TorchServe nor HTTP. A host (the TorchServe entry module in
:mod:`.torchserve`, ``serveready.load`` in :mod:`.host`) hands it a :class:`ModelSource` (the
unpacked archive, its manifest and model-config) and batches of :class:`Request`; it answers
each batch with exactly one :class:`Reply` per request, in order:

1. **decode**: the protocol's codec turns each request into rows through the handler; a
   request that raises InvalidInput keeps its error (400) instead of failing the batch;
2. **inference**: one forward over the rows of all good requests, made the model's inputs by the
   handler's ``collate`` (concatenated, or padded texts), under ``torch.inference_mode()``, on the
   worker's device (explanations: the handler's ``attribute``, Integrated Gradients);
3. **encode**: the output split back by each request's row count, each answered in its protocol.

A fault of the model's (not the client's) raises :class:`BatchFailed` for the whole batch; the
host answers it as TorchServe does (500 to every request of the batch, details in the log).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import protocols
from .base import BatchHandler, Decoded
from .config import ModelOptions, parse
from .errors import ExplanationsUnavailable, HandlerError, ModelLoadError
from .inputs import Inputs, logits
from .loaders import Loaded, load_model, model_format, speed_up
from .observe import BatchStats
from .payload import Request
from .runtime import limit_threads, select_device, worker_threads

try:
    from .. import __version__
except ImportError:  # the handlers package copied without its parent
    __version__ = "unknown"

logger = logging.getLogger(__name__)

#: What a whole batch gets when the model itself fails (TorchServe answers every request of it 500).
BATCH_FAILURE = "inference failed: internal error, see the model log"


@dataclass(frozen=True)
class ModelSource:
    """What a host tells the engine about the model it serves (host-neutral, unlike TorchServe's context)."""

    model_dir: Path
    #: MAR-INF/MANIFEST.json (names the model file and weights)
    manifest: Mapping[str, Any]
    #: model-config.yaml: TorchServe's keys, ``handler:`` and ``model:``
    config: Mapping[str, Any]
    name: str = ""
    #: the GPU a worker was given; None for a CPU worker
    gpu_id: int | None = None
    #: torch threads for this process: None as a TorchServe worker sets them (``handler.torch_threads``,
    #: else cores / maxWorkers), 0 to leave them as they are
    threads: int | None = None
    #: the largest batch the host hands the engine (TorchServe's ``batch_size``); None where unknown
    batch_size: int | None = None

    @property
    def version(self) -> str | None:
        return (self.manifest.get("model") or {}).get("modelVersion")


class Reply(NamedTuple):
    """One request's answer: its status and its body (JSON-able, or bytes/str as a handler made it).

    A named tuple, not a dataclass: one is made per request, on the hot path.
    """

    status: int
    body: Any
    error: HandlerError | None = None

    @property
    def message(self) -> str | None:
        """The error's message (TorchServe sends it as the HTTP reason phrase), None for a 200."""
        return self.error.message if self.error is not None else None


class BatchFailed(HandlerError):
    """The model failed on a batch the client did nothing wrong with: every request of it gets 500."""


@dataclass(frozen=True)
class _Refused:
    error: HandlerError
    protocol: str


def read_options(handler_class: type[BatchHandler], config: Mapping[str, Any]) -> tuple[Any, ModelOptions]:
    """A handler kind's validated ``handler:`` options and the ``model:`` section of a model-config mapping."""
    options = parse(handler_class.options_type, config.get("handler"), "handler")
    model = parse(ModelOptions, config.get("model"), "model")
    handler_class.check(options, model)
    return options, model


class Engine:
    """One loaded model with its handler, answering batches of requests.

    Example:
        engine = Engine(TabularHandler, ModelSource(model_dir, manifest, config, name="net"))
        [reply] = engine.answer([Request({"body": {"inputs": [0.0] * 10}})])
    """

    def __init__(self, handler_class: type[BatchHandler], source: ModelSource) -> None:
        self.source = source
        self.name = source.name
        self.version = source.version
        options, model = read_options(handler_class, source.config)
        threads = source.threads if source.threads is not None else worker_threads(source.config, options.torch_threads, source.batch_size)
        if threads:
            limit_threads(threads)
        device, unused = select_device(source.gpu_id, model_format(model.format).placement)
        try:
            self.loaded: Loaded = load_model(Path(source.model_dir), source.manifest, model, device, torch.get_num_threads())
        except (HandlerError, ModelLoadError):
            raise
        except Exception as err:
            # Any other type would make TorchServe restart the worker forever instead of reporting it.
            raise ModelLoadError(f"the {model.format} model cannot be loaded on {device}: {err}") from err
        self.model_options = model
        self.sample_inputs: Inputs = tuple(handler_class.model_inputs(options, model).values())
        self.loaded = speed_up(self.loaded, model, options.fold_batchnorm, options.channels_last,
                               tuple(t.to(self.loaded.inputs_on) for t in self.sample_inputs))
        self.model, self.device = self.loaded.run, self.loaded.inputs_on
        self.sample_outputs = self._smoke_test()
        self.handler = handler_class(options, model, Path(source.model_dir))
        # as many decoding threads as torch threads: the cores a batch computes on decode its requests
        cores = torch.get_num_threads()
        self._decoders = ThreadPoolExecutor(cores, thread_name_prefix="serveready-decode") if handler_class.heavy_decode and cores > 1 else None
        _adapt_old_decode(self.handler)
        self.handler.setup(self.sample_outputs)
        logger.info(
            "serveready %s %s (code in %s): %s model %s runs with %s, %d torch thread(s)%s",
            __version__, handler_class.__name__, Path(__file__).parent, model.format,
            source.name, self.loaded.describe(), torch.get_num_threads(), f"; {unused}" if unused else "",
        )

    @property
    def options(self) -> Any:
        return self.handler.options

    def close(self) -> None:
        """Let the decoding threads go (a worker process simply exits; an in-process host calls this)."""
        if self._decoders is not None:
            self._decoders.shutdown(wait=False)

    def _smoke_test(self) -> torch.Tensor:
        """The handler's sample inputs (zeros of ``model.sample_shape``): a model that cannot run where it was
        put fails here, at load time, not at its first request (and it is warmed up)."""
        try:
            return self.inference(self.sample_inputs)
        except Exception as err:
            raise ModelLoadError(f"the {self.model_options.format} model does not run with {self.loaded.describe()}: {err}") from err

    # -- the batch -----------------------------------------------------------------
    def answer(self, requests: Sequence[Request], stats: BatchStats | None = None) -> list[Reply]:
        """Exactly one reply per request, in order.

        Raises:
            BatchFailed: the model failed (the host answers every request of the batch 500).
        """
        stats = BatchStats() if stats is None else stats
        began = time.perf_counter()
        if self._decoders is not None and len(requests) > 1:
            decoded = list(self._decoders.map(self._decode, range(len(requests)), requests))
        else:
            decoded = [self._decode(idx, request) for idx, request in enumerate(requests)]
        stats.timed("preprocess", began)
        replies: list[Reply | None] = [None] * len(decoded)
        predicted: list[int] = []
        explained: list[int] = []
        for idx, item in enumerate(decoded):
            if isinstance(item, _Refused):
                replies[idx] = _refusal(item.error, item.protocol, stats)
            else:
                (explained if item.explain else predicted).append(idx)
        for explain, group in ((False, predicted), (True, explained)):
            if not group:
                continue
            items = [decoded[i] for i in group]
            try:
                for i, body in zip(group, self._run(items, explain, stats), strict=True):  # type: ignore[arg-type]
                    replies[i] = Reply(200, body)
            except ExplanationsUnavailable as err:
                for i in group:
                    replies[i] = _refusal(err, decoded[i].protocol, stats)  # type: ignore[union-attr]
        return replies  # type: ignore[return-value]

    def _decode(self, idx: int, request: Request) -> Decoded | _Refused:
        protocol = ""
        try:
            protocol, document = protocols.sniff(request)
            item = protocols.CODECS[protocol].decode(self.handler, request, document)
        except HandlerError as err:
            # A body that could not be read says its protocol only by header (v2's binary extension).
            return _Refused(err, protocol or protocols.announced(request.headers))
        except Exception:
            # A fault in decoding code, not the client's: log it, fail this request alone.
            logger.exception("decoding request %d failed", idx)
            return _Refused(HandlerError("this request could not be decoded: internal error, see the model log"), protocol or protocols.OWN)
        item.protocol = protocol
        item.explain = request.explain
        return item

    def _run(self, items: list[Decoded], explain: bool, stats: BatchStats) -> list[Any]:
        sizes = [len(item.rows) for item in items]
        model = (self.name, self.version)
        try:
            began = time.perf_counter()
            batch = self.handler.collate(items)
            stats.timed("preprocess", began)
            stats.rows += sum(sizes)
            if not explain:
                began = time.perf_counter()
                outputs = self.inference(batch)
                stats.timed("inference", began)
                began = time.perf_counter()
                encoded = [protocols.CODECS[item.protocol].answer(self.handler, item, rows, model)
                           for item, rows in zip(items, _split(outputs, sizes), strict=True)]
                stats.timed("postprocess", began)
                return encoded
            began = time.perf_counter()
            outputs, attributions = self.attribute(batch)
            stats.timed("explain", began)
            pairs = zip(items, _split(outputs, sizes), _split(attributions, sizes), strict=True)
            return [protocols.CODECS[item.protocol].explanation(self.handler, item, out, attr, model) for item, out, attr in pairs]
        except HandlerError:
            raise
        except Exception as err:
            # The client did nothing wrong: keep details in the log, not the answer.
            logger.exception("%s failed", "explanation" if explain else "inference")
            raise BatchFailed(BATCH_FAILURE) from err

    def inference(self, batch: Inputs) -> torch.Tensor:
        """One forward pass over the rows of every good request in the batch."""
        if not torch.is_grad_enabled():  # a host that turned autograd off for good (a TorchServe worker): no context per batch
            return self.forward(*batch).float().cpu()
        with torch.inference_mode():
            return self.forward(*batch).float().cpu()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The model on ``inputs`` (moved to its device); a Hugging Face ``ModelOutput`` is read through ``.logits``."""
        device = self.device
        output = self.model(*[t.to(device) for t in inputs]) if len(inputs) > 1 else self.model(inputs[0].to(device))
        return output if isinstance(output, torch.Tensor) else logits(output)

    def attribute(self, batch: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs and the handler's attributions (Integrated Gradients, Captum) for ``batch``."""
        if not self.loaded.differentiable:
            raise ExplanationsUnavailable(f"explanations need gradients, and this archive's {self.model_options.format} model has none: ask the fp32 model")
        try:
            import captum.attr  # noqa: F401  (the handler's attribute uses it; here, to say what is missing)
        except ImportError as err:  # captum.attr imports matplotlib too: name what is missing
            missing = err.name or "captum"
            because = "" if missing == "captum" else f" (captum needs it: {err})"
            raise ExplanationsUnavailable(f"explanations need captum on the TorchServe host: pip install {missing}{because}") from None
        outputs = self.inference(batch)
        inputs = tuple(t.to(self.device) for t in batch)
        target = self.handler.explain_target(outputs)
        if isinstance(target, torch.Tensor):
            target = target.to(self.device)
        with torch.enable_grad():
            attributions = self.handler.attribute(self.forward, self.loaded.module, inputs, target)
        return outputs, attributions.detach().float().cpu()


def _split(values: torch.Tensor, sizes: list[int]) -> Sequence[torch.Tensor]:
    # One request (most batches at low load) needs no split: ~12 us saved per batch.
    return (values,) if len(sizes) == 1 else torch.split(values, sizes)


def _refusal(err: HandlerError, protocol: str, stats: BatchStats) -> Reply:
    stats.refused[(err.status, type(err).__name__)] += 1
    return Reply(err.status, protocols.CODECS[protocol].error(err), err)


def _adapt_old_decode(handler: BatchHandler) -> None:
    """A handler written for serveready 0.2 defines ``decode(request, headers)`` over TorchServe's request
    dict: call it that way (CHANGELOG.md says how to move to ``decode(request)``)."""
    try:
        parameters = inspect.signature(handler.decode).parameters
    except (TypeError, ValueError):
        return
    if len(parameters) == 2:
        old = handler.decode
        handler.decode = lambda request: old(request.fields, request.headers)  # type: ignore[method-assign]
