"""The lifecycle every handler shares: initialize -> preprocess -> inference -> postprocess.

A subclass says only how one request becomes a tensor of rows
(:meth:`BatchHandler.decode`) and how that request's output rows become its
response (:meth:`BatchHandler.encode`). Batching, per-request errors,
explanations and the batch contract (one answer per request, in order) live
here, once.

Example, a handler of one's own (named in a model config as ``handler: {entry: my_handler.py}``):

    from dataclasses import dataclass
    from serveready.handlers import BatchHandler, Decoded, HandlerOptions, option

    @dataclass(frozen=True, kw_only=True)
    class ScoreOptions(HandlerOptions):
        scale: float = option(1.0, doc="multiplies every score")

    class ScoreHandler(BatchHandler):
        options_type = ScoreOptions

        def decode(self, request, headers):
            return Decoded(parse_rows(...))

        def encode(self, item, outputs):
            return {"scores": (outputs * self.options.scale).tolist()}
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from . import observe, protocols
from .config import HandlerOptions, ModelOptions, parse
from .errors import ExplanationsUnavailable, HandlerError, InvalidInput, ModelLoadError
from .loaders import Loaded, Model, load_model, model_format
from .runtime import default_threads, limit_threads, quiet_per_batch_log, select_device

try:
    from .. import __version__
except ImportError:  # the handlers package copied without its parent
    __version__ = "unknown"

logger = logging.getLogger(__name__)

#: TorchServe marks requests to /explanations/<model> with this request header.
EXPLAIN_HEADER = "explain"


@dataclass
class Decoded:
    """One request, decoded: its model input rows and any per-request options (e.g. top-k)."""

    rows: torch.Tensor
    options: dict[str, Any] = field(default_factory=dict)
    explain: bool = False
    #: which protocol it came in (and is answered in): the handler's own JSON, KServe v1 or v2
    protocol: str = protocols.OWN
    #: a v2 request's "id", echoed
    request_id: Any = None


@dataclass(frozen=True)
class Refused:
    """One request that cannot be served, and the protocol its error answer takes."""

    error: HandlerError
    protocol: str = protocols.OWN


class BatchHandler:
    """Shared TorchServe handler: batching, validation errors as 400s, eval-mode inference.

    ``options_type`` is the dataclass of the ``handler:`` options this kind takes;
    :meth:`check` cross-checks them against the model (the archiver calls both at
    build time, so a bad option fails the build, not the worker).
    """

    options_type: ClassVar[type[HandlerOptions]] = HandlerOptions

    def __init__(self) -> None:
        self.model: Model | None = None
        #: where input batches go (set from what the loader says)
        self.device = torch.device("cpu")
        self.loaded: Loaded | None = None
        self.options: Any = HandlerOptions()
        self.model_options: ModelOptions | None = None
        self.model_dir = Path(".")
        self.initialized = False

    @classmethod
    def check(cls, options: Any, model: ModelOptions) -> None:
        """Refuse options that cannot work with ``model`` (raise ConfigError naming the key); none here."""

    @classmethod
    def check_outputs(cls, options: Any, model_dir: Path, outputs: torch.Tensor) -> None:
        """Refuse an archive whose files do not fit the model's sample outputs (raise ModelLoadError); none here."""

    @classmethod
    def read_options(cls, config: Mapping[str, Any]) -> tuple[Any, ModelOptions]:
        """This kind's validated ``handler:`` options and the ``model:`` section of a model-config mapping."""
        options = parse(cls.options_type, config.get("handler"), "handler")
        model = parse(ModelOptions, config.get("model"), "model")
        cls.check(options, model)
        return options, model

    # -- load time ---------------------------------------------------------
    def initialize(self, context: Any) -> None:
        """Read and validate the archive's config, pick device and threads, load the model."""
        properties = context.system_properties
        config = dict(context.model_yaml_config or {})
        self.options, self.model_options = self.read_options(config)
        self.model_dir = Path(properties["model_dir"])
        self.model_name = str(getattr(context, "model_name", "") or "")
        self.model_version = ((context.manifest or {}).get("model") or {}).get("modelVersion")
        limit_threads(self.options.torch_threads or default_threads(config))
        quiet_per_batch_log()
        gpu_id = properties.get("gpu_id")
        device, unused = select_device(gpu_id, model_format(self.model_options.format).placement)
        try:
            self.loaded = self.load_model(self.model_dir, context.manifest or {}, device)
        except HandlerError:
            raise
        except Exception as err:
            # Any other type would make TorchServe restart the worker forever instead of reporting it.
            raise ModelLoadError(f"the {self.model_options.format} model cannot be loaded on {device}: {err}") from err
        self.model, self.device = self.loaded.run, self.loaded.inputs_on
        self.sample_outputs = self.smoke_test()
        self.initialized = True
        logger.info(
            "serveready %s %s (code in %s): %s model %s runs with %s, %d torch thread(s)%s",
            __version__, type(self).__name__, Path(__file__).parent, self.model_options.format,
            context.model_name, self.loaded.describe(), torch.get_num_threads(), f"; {unused}" if unused else "",
        )

    def load_model(self, model_dir: Path, manifest: Mapping[str, Any], device: torch.device) -> Loaded:
        """Load the archive's model for ``device`` with the loader its ``model.format`` names."""
        assert self.model_options is not None
        return load_model(model_dir, manifest, self.model_options, device, torch.get_num_threads())

    def smoke_test(self) -> torch.Tensor:
        """Run a zero batch of ``model.sample_shape`` through the model: a model that cannot run
        where it was put fails here, at load time, not at its first request (and warms it up)."""
        assert self.model_options is not None and self.loaded is not None
        try:
            return self.inference(torch.zeros(self.model_options.sample_shape))
        except Exception as err:
            raise ModelLoadError(f"the {self.model_options.format} model does not run with {self.loaded.describe()}: {err}") from err

    # -- per request hooks -------------------------------------------------
    def decode(self, request: Mapping[str, Any], headers: Mapping[str, str]) -> Decoded:
        """Turn one request (and its HTTP headers, names lower-cased) into rows; raise InvalidInput if it is wrong."""
        raise NotImplementedError

    def encode(self, item: Decoded, outputs: torch.Tensor) -> Any:
        """Turn one request's output rows into its JSON-able response."""
        raise NotImplementedError

    def encode_explanation(self, item: Decoded, outputs: torch.Tensor, attributions: torch.Tensor) -> Any:
        """One request's explanation: its usual answer plus per-input attributions."""
        return {**self.encode(item, outputs), "attributions": attributions.tolist()}

    def decode_instances(self, instances: list[Any], headers: Mapping[str, str]) -> Decoded:
        """A KServe v1 request's ``instances`` into rows (raise InvalidInput if they are wrong)."""
        raise InvalidInput(f"{type(self).__name__} does not take KServe v1 requests")

    def decode_tensor(self, tensor: protocols.Tensor, headers: Mapping[str, str]) -> Decoded:
        """An Open Inference Protocol (v2) request's input tensor into rows (raise InvalidInput if it is wrong)."""
        raise InvalidInput(f"{type(self).__name__} does not take Open Inference Protocol (v2) requests")

    def encode_v1(self, item: Decoded, outputs: torch.Tensor) -> Any:
        """A KServe v1 answer: ``{"predictions": [one per instance]}``."""
        return self.encode(item, outputs)

    def v2_outputs(self, item: Decoded, outputs: torch.Tensor) -> list[dict[str, Any]]:
        """A v2 answer's output tensors: the model's outputs, one row per input row."""
        return [protocols.v2_output("predictions", outputs)]

    def explain_target(self, outputs: torch.Tensor) -> torch.Tensor | int:
        """Which output to attribute: the predicted class for classifiers, output 0 otherwise."""
        return outputs.argmax(dim=1) if outputs.shape[1] > 1 else 0

    # -- the lifecycle -----------------------------------------------------
    def preprocess(self, data: Sequence[Mapping[str, Any]], context: Any = None) -> list[Decoded | Refused]:
        """Decode every request; a bad one becomes its error (400, or 500 for a fault of ours), not the batch's failure."""
        decoded: list[Decoded | Refused] = []
        for idx, request in enumerate(data):
            headers = RequestHeaders(context, idx)
            protocol = ""
            try:
                protocol, document = protocols.sniff(request, headers)
                item = self._decode(protocol, document, request, headers)
            except HandlerError as err:
                # A body that could not be read says its protocol only by header (v2's binary extension).
                decoded.append(Refused(err, protocol or protocols.announced(headers)))
                continue
            except Exception:
                # A fault in decoding code, not the client's: log it, fail this request alone.
                logger.exception("decoding request %d failed", idx)
                decoded.append(Refused(HandlerError("this request could not be decoded: internal error, see the model log"), protocol or protocols.OWN))
                continue
            item.explain = _explain_asked(context, idx)
            decoded.append(item)
        return decoded

    def _decode(self, protocol: str, document: Any, request: Mapping[str, Any], headers: Mapping[str, str]) -> Decoded:
        if protocol == protocols.V1:
            item = self.decode_instances(protocols.v1_instances(document, self.max_instances), headers)
        elif protocol == protocols.V2:
            item = self.decode_tensor(protocols.v2_input(document), headers)
            item.request_id = document.get("id")
        else:  # the body parsed once: hand the document on, not the bytes again
            item = self.decode(request if document is None else {"body": document}, headers)
        item.protocol = protocol
        return item

    @property
    def max_instances(self) -> int:
        """The most inputs one KServe v1 request may carry."""
        return int(getattr(self.options, "max_rows", 64))

    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        """One forward pass over the rows of every good request in the batch."""
        assert self.model is not None, "initialize() was not called"
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu()

    def attribute(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs and Integrated Gradients attributions (Captum) for ``batch``."""
        if self.loaded is not None and not self.loaded.differentiable:
            fmt = self.model_options.format if self.model_options else "loaded"
            raise ExplanationsUnavailable(f"explanations need gradients, and this archive's {fmt} model has none: ask the fp32 model")
        try:
            from captum.attr import IntegratedGradients
        except ImportError as err:  # captum.attr imports matplotlib too: name what is missing
            missing = err.name or "captum"
            because = "" if missing == "captum" else f" (captum needs it: {err})"
            raise ExplanationsUnavailable(f"explanations need captum on the TorchServe host: pip install {missing}{because}") from None
        outputs = self.inference(batch)
        inputs = batch.to(self.device).clone().requires_grad_(True)
        with torch.enable_grad():
            attributions = IntegratedGradients(self.model).attribute(
                inputs, baselines=torch.zeros_like(inputs), target=self._on_device(self.explain_target(outputs)), n_steps=self.options.ig_steps
            )
        return outputs, attributions.detach().float().cpu()

    def postprocess(self, items: Sequence[Decoded], outputs: Sequence[torch.Tensor]) -> list[Any]:
        """Encode each request's own rows, in the protocol it came in."""
        return [self._encode(item, rows) for item, rows in zip(items, outputs, strict=True)]

    def _encode(self, item: Decoded, rows: torch.Tensor) -> Any:
        if item.protocol == protocols.V2:
            return protocols.v2_response(self.model_name, self.model_version, item.request_id, self.v2_outputs(item, rows))
        if item.protocol == protocols.V1:
            return self.encode_v1(item, rows)
        return self.encode(item, rows)

    def handle(self, data: Sequence[Mapping[str, Any]], context: Any) -> list[Any]:
        """TorchServe's entry point: exactly one answer per request, in order; JSON answers as compact UTF-8 bytes.

        TorchServe would encode a dict itself with ``json.dumps(indent=2)``, the pure-Python
        encoder: that was most of the handler's time per request for a small model.
        """
        stats = observe.BatchStats()
        answers = self.answers(data, context, stats)
        began = time.perf_counter()
        for idx, body in enumerate(answers):
            if isinstance(body, (dict, list)):
                answers[idx] = json.dumps(body, separators=(",", ":")).encode()
                _say_json(context, idx)
        stats.timed("postprocess", began)
        if self.options.metrics:
            observe.emit(context, stats)
        return answers

    def answers(self, data: Sequence[Mapping[str, Any]], context: Any = None, stats: observe.BatchStats | None = None) -> list[Any]:
        """One answer per request, in order, as Python objects (``handle`` without the JSON encoding)."""
        stats = observe.BatchStats() if stats is None else stats
        began = time.perf_counter()
        decoded = self.preprocess(data, context)
        stats.timed("preprocess", began)
        answers: list[Any] = [None] * len(decoded)
        for idx, item in enumerate(decoded):
            if isinstance(item, Refused):
                answers[idx] = _fail(context, idx, item.error, item.protocol, stats)
        for explain in (False, True):
            group = [i for i, item in enumerate(decoded) if isinstance(item, Decoded) and item.explain is explain]
            if not group:
                continue
            items = [decoded[i] for i in group]
            try:
                for i, body in zip(group, self._run(items, explain, stats), strict=True):
                    answers[i] = body
            except ExplanationsUnavailable as err:
                for i in group:
                    answers[i] = _fail(context, i, err, decoded[i].protocol, stats)
        return answers

    def _run(self, items: list[Decoded], explain: bool, stats: observe.BatchStats) -> list[Any]:
        sizes = [item.rows.shape[0] for item in items]
        batch = torch.cat([item.rows for item in items])
        stats.rows += batch.shape[0]
        try:
            if not explain:
                began = time.perf_counter()
                outputs = self.inference(batch)
                stats.timed("inference", began)
                began = time.perf_counter()
                encoded = self.postprocess(items, torch.split(outputs, sizes))
                stats.timed("postprocess", began)
                return encoded
            began = time.perf_counter()
            outputs, attributions = self.attribute(batch)
            stats.timed("explain", began)
            pairs = zip(items, torch.split(outputs, sizes), torch.split(attributions, sizes), strict=True)
            return [self.encode_explanation(item, out, attr) for item, out, attr in pairs]
        except HandlerError:
            raise
        except Exception as err:
            # The client did nothing wrong: keep details in the log, not the answer.
            logger.exception("%s failed", "explanation" if explain else "inference")
            raise _prediction_error("inference failed: internal error, see the model log", 500) from err

    def _on_device(self, target: torch.Tensor | int) -> torch.Tensor | int:
        return target.to(self.device) if isinstance(target, torch.Tensor) else target


def error_body(err: HandlerError) -> dict[str, Any]:
    """The JSON body of a failed request: status, error type and the message."""
    return {"code": err.status, "type": type(err).__name__, "message": err.message}


def _fail(context: Any, idx: int, err: HandlerError, protocol: str = protocols.OWN, stats: observe.BatchStats | None = None) -> dict[str, Any]:
    if stats is not None:
        stats.refused[(err.status, type(err).__name__)] += 1
    if context is not None:
        context.set_response_status(err.status, err.message, idx)
    return protocols.v2_error(err.message) if protocol == protocols.V2 else error_body(err)


def _say_json(context: Any, idx: int) -> None:
    try:
        context.set_response_content_type(idx, "application/json")
    except (AttributeError, IndexError, TypeError):  # no TorchServe request data (plain use)
        pass


def _explain_asked(context: Any, idx: int) -> bool:
    # TorchServe's /explanations route sets this header itself (lower-case): one lookup, not a header copy.
    try:
        return context.get_request_header(idx, EXPLAIN_HEADER) == "True"
    except (AttributeError, IndexError, TypeError, KeyError):
        return False


class RequestHeaders(Mapping[str, str]):
    """One request's HTTP headers, names lower-cased, read from the context only when a handler asks."""

    def __init__(self, context: Any, idx: int) -> None:
        self._context, self._idx = context, idx
        self._found: dict[str, str] | None = None

    def _all(self) -> dict[str, str]:
        if self._found is None:
            try:
                found = self._context.get_all_request_header(self._idx)
            except (AttributeError, IndexError, TypeError):  # no TorchServe request data (plain use)
                found = {}
            self._found = {str(k).lower(): v for k, v in found.items() if isinstance(v, str)}
        return self._found

    def __getitem__(self, name: str) -> str:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def _prediction_error(message: str, code: int) -> Exception:
    # TorchServe's own exception gives its code to the whole batch; without ts (plain
    # in-process use) a HandlerError carries the same message.
    try:
        from ts.utils.util import PredictionException
    except ImportError:
        return HandlerError(message)
    return PredictionException(message, code)
