"""The lifecycle every handler shares: initialize -> preprocess -> inference -> postprocess.

A subclass says only how one request becomes a tensor of rows
(:meth:`BatchHandler.decode`) and how that request's output rows become its
response (:meth:`BatchHandler.encode`). Batching, per-request errors and the
batch contract (one answer per request, in order) live here, once.

Example:
    class TabularHandler(BatchHandler):
        def decode(self, request):
            return torch.from_numpy(parse_rows(...))

        def encode(self, rows):
            return {"predictions": rows.tolist()}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from handlers.errors import HandlerError, InvalidInput
from handlers.runtime import default_threads, limit_threads, load_eager_model, select_device

logger = logging.getLogger(__name__)

Model = Callable[[torch.Tensor], torch.Tensor]


class BatchHandler:
    """Shared TorchServe handler: batching, validation errors as 400s, eval-mode inference."""

    def __init__(self) -> None:
        self.model: Model | None = None
        self.device = torch.device("cpu")
        self.options: dict[str, Any] = {}
        self.context: Any = None
        self.initialized = False

    # -- load time ---------------------------------------------------------
    def initialize(self, context: Any) -> None:
        """Read the archive's config, pick device and threads, load the model."""
        properties = context.system_properties
        config = dict(context.model_yaml_config or {})
        self.context = context
        self.options = dict(config.get("handler") or {})
        limit_threads(int(self.options.get("torch_threads") or default_threads(config)))
        self.device = select_device(properties.get("gpu_id"))
        self.model = self.load_model(Path(properties["model_dir"]), context.manifest or {})
        self.initialized = True
        logger.info("loaded %s on %s with %d torch threads", context.model_name, self.device, torch.get_num_threads())

    def load_model(self, model_dir: Path, manifest: Mapping[str, Any]) -> Model:
        """Load the archive's eager model; variants override this and nothing else."""
        entry = manifest.get("model", {})
        return load_eager_model(
            model_dir / entry.get("modelFile", ""),
            self.options.get("model_class", ""),
            self.options.get("model_kwargs") or {},
            model_dir / entry.get("serializedFile", ""),
            self.device,
        )

    # -- per request hooks -------------------------------------------------
    def decode(self, request: Mapping[str, Any]) -> torch.Tensor:
        """Turn one request into a (rows, ...) tensor; raise InvalidInput if it is wrong."""
        raise NotImplementedError

    def encode(self, rows: torch.Tensor) -> Any:
        """Turn one request's output rows into its JSON-able response."""
        raise NotImplementedError

    # -- the lifecycle -----------------------------------------------------
    def preprocess(self, data: Sequence[Mapping[str, Any]]) -> list[torch.Tensor | InvalidInput]:
        """Decode every request; a bad one becomes its InvalidInput, not the batch's failure."""
        decoded: list[torch.Tensor | InvalidInput] = []
        for request in data:
            try:
                decoded.append(self.decode(request))
            except InvalidInput as err:
                decoded.append(err)
        return decoded

    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        """One forward pass over the rows of every good request in the batch."""
        assert self.model is not None, "initialize() was not called"
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu()

    def postprocess(self, outputs: Sequence[torch.Tensor]) -> list[Any]:
        """Encode each request's own rows."""
        return [self.encode(rows) for rows in outputs]

    def handle(self, data: Sequence[Mapping[str, Any]], context: Any) -> list[Any]:
        """TorchServe's entry point: returns exactly one answer per request, in order."""
        decoded = self.preprocess(data)
        answers: list[Any] = [None] * len(decoded)
        good = [i for i, item in enumerate(decoded) if isinstance(item, torch.Tensor)]
        for i, item in enumerate(decoded):
            if isinstance(item, InvalidInput):
                answers[i] = error_body(item)
                context.set_response_status(item.status, item.message, i)
        if good:
            tensors = [decoded[i] for i in good]
            sizes = [t.shape[0] for t in tensors]
            try:
                outputs = self.inference(torch.cat(tensors))
            except Exception as err:
                # The client did nothing wrong: keep details in the log, not the answer.
                logger.exception("inference failed for %s", getattr(context, "model_name", "?"))
                raise _prediction_error("inference failed: internal error, see the model log", 500) from err
            for i, body in zip(good, self.postprocess(torch.split(outputs, sizes))):
                answers[i] = body
        return answers


def error_body(err: HandlerError) -> dict[str, Any]:
    """The JSON body of a failed request: status, error type and the message."""
    return {"code": err.status, "type": type(err).__name__, "message": err.message}


def _prediction_error(message: str, code: int) -> Exception:
    # TorchServe's own exception gives its code to the whole batch; without ts (plain
    # in-process use) a HandlerError carries the same message.
    try:
        from ts.utils.util import PredictionException
    except ImportError:
        return HandlerError(message)
    return PredictionException(message, code)
