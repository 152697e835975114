"""The lifecycle every handler shares: initialize -> preprocess -> inference -> postprocess.

A subclass says only how one request becomes a tensor of rows
(:meth:`BatchHandler.decode`) and how that request's output rows become its
response (:meth:`BatchHandler.encode`). Batching, per-request errors,
explanations and the batch contract (one answer per request, in order) live
here, once.

Example:
    class TabularHandler(BatchHandler):
        def decode(self, request):
            return Decoded(parse_rows(...))

        def encode(self, item, outputs):
            return {"predictions": outputs.tolist()}
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from handlers.errors import ExplanationsUnavailable, HandlerError, InvalidInput
from handlers.loaders import load_model
from handlers.runtime import default_threads, limit_threads, select_device

logger = logging.getLogger(__name__)

Model = Callable[[torch.Tensor], torch.Tensor]

#: TorchServe marks requests to /explanations/<model> with this request header.
EXPLAIN_HEADER = "explain"


@dataclass
class Decoded:
    """One request, decoded: its model input rows and any per-request options (e.g. top-k)."""

    rows: torch.Tensor
    options: dict[str, Any] = field(default_factory=dict)
    explain: bool = False


class BatchHandler:
    """Shared TorchServe handler: batching, validation errors as 400s, eval-mode inference."""

    def __init__(self) -> None:
        self.model: Model | None = None
        self.device = torch.device("cpu")
        self.options: dict[str, Any] = {}
        self.model_dir = Path(".")
        self.initialized = False

    # -- load time ---------------------------------------------------------
    def initialize(self, context: Any) -> None:
        """Read the archive's config, pick device and threads, load the model."""
        properties = context.system_properties
        config = dict(context.model_yaml_config or {})
        self.options = dict(config.get("handler") or {})
        self.model_dir = Path(properties["model_dir"])
        limit_threads(int(self.options.get("torch_threads") or default_threads(config)))
        self.device = select_device(properties.get("gpu_id"))
        self.model = self.load_model(self.model_dir, context.manifest or {})
        self.initialized = True
        logger.info("loaded %s on %s with %d torch threads", context.model_name, self.device, torch.get_num_threads())

    def load_model(self, model_dir: Path, manifest: Mapping[str, Any]) -> Model:
        """Load the archive's model with the loader its ``handler.format`` names (default: eager)."""
        return load_model(model_dir, manifest, self.options, self.device)

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

    def explain_target(self, outputs: torch.Tensor) -> torch.Tensor | int:
        """Which output to attribute: the predicted class for classifiers, output 0 otherwise."""
        return outputs.argmax(dim=1) if outputs.shape[1] > 1 else 0

    # -- the lifecycle -----------------------------------------------------
    def preprocess(self, data: Sequence[Mapping[str, Any]], context: Any = None) -> list[Decoded | InvalidInput]:
        """Decode every request; a bad one becomes its InvalidInput, not the batch's failure."""
        decoded: list[Decoded | InvalidInput] = []
        for idx, request in enumerate(data):
            headers = _headers(context, idx)
            try:
                item = self.decode(request, headers)
            except InvalidInput as err:
                decoded.append(err)
                continue
            item.explain = headers.get(EXPLAIN_HEADER) == "True"
            decoded.append(item)
        return decoded

    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        """One forward pass over the rows of every good request in the batch."""
        assert self.model is not None, "initialize() was not called"
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu()

    def attribute(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs and Integrated Gradients attributions (Captum) for ``batch``."""
        if getattr(self.model, "differentiable", True) is False:
            raise ExplanationsUnavailable(f"explanations need gradients, and this archive's {self.options.get('format')} model has none: ask the fp32 model")
        try:
            from captum.attr import IntegratedGradients
        except ImportError:
            raise ExplanationsUnavailable("explanations need captum on the TorchServe host: pip install captum") from None
        outputs = self.inference(batch)
        inputs = batch.to(self.device).clone().requires_grad_(True)
        with torch.enable_grad():
            attributions = IntegratedGradients(self.model).attribute(
                inputs, baselines=torch.zeros_like(inputs), target=self._on_device(self.explain_target(outputs)), n_steps=int(self.options.get("ig_steps", 50))
            )
        return outputs, attributions.detach().float().cpu()

    def postprocess(self, items: Sequence[Decoded], outputs: Sequence[torch.Tensor]) -> list[Any]:
        """Encode each request's own rows."""
        return [self.encode(item, rows) for item, rows in zip(items, outputs, strict=True)]

    def handle(self, data: Sequence[Mapping[str, Any]], context: Any) -> list[Any]:
        """TorchServe's entry point: returns exactly one answer per request, in order."""
        decoded = self.preprocess(data, context)
        answers: list[Any] = [None] * len(decoded)
        for idx, item in enumerate(decoded):
            if isinstance(item, InvalidInput):
                answers[idx] = _fail(context, idx, item)
        for explain in (False, True):
            group = [i for i, item in enumerate(decoded) if isinstance(item, Decoded) and item.explain is explain]
            if not group:
                continue
            items = [decoded[i] for i in group]
            try:
                for i, body in zip(group, self._run(items, explain), strict=True):
                    answers[i] = body
            except ExplanationsUnavailable as err:
                for i in group:
                    answers[i] = _fail(context, i, err)
        return answers

    def _run(self, items: list[Decoded], explain: bool) -> list[Any]:
        sizes = [item.rows.shape[0] for item in items]
        batch = torch.cat([item.rows for item in items])
        try:
            if not explain:
                return self.postprocess(items, torch.split(self.inference(batch), sizes))
            outputs, attributions = self.attribute(batch)
        except HandlerError:
            raise
        except Exception as err:
            # The client did nothing wrong: keep details in the log, not the answer.
            logger.exception("%s failed", "explanation" if explain else "inference")
            raise _prediction_error("inference failed: internal error, see the model log", 500) from err
        pairs = zip(items, torch.split(outputs, sizes), torch.split(attributions, sizes), strict=True)
        return [self.encode_explanation(item, out, attr) for item, out, attr in pairs]

    def _on_device(self, target: torch.Tensor | int) -> torch.Tensor | int:
        return target.to(self.device) if isinstance(target, torch.Tensor) else target


def error_body(err: HandlerError) -> dict[str, Any]:
    """The JSON body of a failed request: status, error type and the message."""
    return {"code": err.status, "type": type(err).__name__, "message": err.message}


def _fail(context: Any, idx: int, err: HandlerError) -> dict[str, Any]:
    if context is not None:
        context.set_response_status(err.status, err.message, idx)
    return error_body(err)


def _headers(context: Any, idx: int) -> dict[str, str]:
    try:
        found = context.get_all_request_header(idx)
    except (AttributeError, IndexError, TypeError):  # no TorchServe request data (plain use)
        return {}
    return {str(k).lower(): v for k, v in found.items() if isinstance(v, str)}


def _prediction_error(message: str, code: int) -> Exception:
    # TorchServe's own exception gives its code to the whole batch; without ts (plain
    # in-process use) a HandlerError carries the same message.
    try:
        from ts.utils.util import PredictionException
    except ImportError:
        return HandlerError(message)
    return PredictionException(message, code)
