"""What one kind of input says: how a request becomes model input, and how model output becomes an answer.

A handler knows the model, not the wire. The wire formats (this library's JSON, KServe v1,
the Open Inference Protocol v2, explanations) are codecs in :mod:`.protocols` that sit
around every handler; batching, per-request errors, metrics and the host (a TorchServe
worker, ``serveready.load``) live in :mod:`.engine` and the adapters. A subclass says:

    decode(request)             this handler's own request format -> Decoded rows (required)
    decode_instance(value)      one KServe v1 instance or one v2 element -> one model input
                                (default: numbers of the model's input shape)
    encode_rows(outputs, item)  output rows -> one JSON value each (default: the numbers)

and, where the defaults do not fit: ``encode`` (its own format's answer), ``decode_instances``
(all of a v1/v2 request's inputs at once), ``tensor_outputs`` (what a v2 client gets as
numbers), ``explain_rows`` (what an explanation adds per input), ``instance_of`` (the request
input that gives a model input, for tools), ``check`` (options against the model, at build
time) and ``setup`` (after the model loaded).

A model with several inputs (a text model's ``forward(input_ids, attention_mask)``), or rows
that only become tensors together (texts padded to the batch's longest), also says
``model_inputs`` (named sample inputs: what exports and checks feed it), ``dynamic_dims`` (the
sizes that vary between batches besides the batch), ``collate`` (the decoded requests of a
batch -> the model's inputs) and ``attribute`` (what explanations attribute).

Example, a handler of one's own (named in a model config as ``handler: {entry: my_handler.py}``):

    from dataclasses import dataclass
    from serveready.handlers import BatchHandler, Decoded, HandlerOptions, option, parse_rows

    @dataclass(frozen=True, kw_only=True)
    class ScoreOptions(HandlerOptions):
        scale: float = option(1.0, doc="multiplies every score")

    class ScoreHandler(BatchHandler):
        options_type = ScoreOptions

        def decode(self, request):
            return Decoded(parse_rows(request.json()["rows"], 10, 64))

        def encode_rows(self, outputs, item):
            return (outputs * self.options.scale).tolist()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .config import HandlerOptions, ModelOptions
from .errors import InvalidInput
from .inputs import Inputs
from .payload import Request, parse_array

OWN = "own"


@dataclass
class Decoded:
    """One request, decoded: its model input rows, per-request options (e.g. top-k), and how it is answered."""

    #: a tensor with one row per input (the default ``collate`` concatenates them), or whatever the
    #: handler's own ``collate`` takes (a text handler's texts); ``len(rows)`` is the number of inputs
    rows: Any
    options: dict[str, Any] = field(default_factory=dict)
    #: the answer is one item (one image, one text), not a list with an entry per row
    single: bool = False
    #: set by the engine: an explanation was asked for
    explain: bool = False
    #: set by the codec: the protocol it came in and is answered in (own, kserve-v1, oip-v2)
    protocol: str = OWN
    #: set by the codec: a v2 request's "id", echoed
    request_id: Any = None
    #: set by a handler's ``collate``: what its rows became, per input (a text handler's tokens)
    encoded: Any = None


class BatchHandler:
    """The base of every handler: the hooks one kind of input needs, with defaults for a plain tensor model.

    ``options_type`` is the dataclass of the ``handler:`` options this kind takes; the
    archiver validates a config against it at build time and the engine again at load time.
    An instance is made once the model is loaded, with the validated options.
    """

    options_type: ClassVar[type[HandlerOptions]] = HandlerOptions
    #: the most inputs one KServe v1 or v2 request may carry
    max_instances: ClassVar[int] = 64
    #: what the serving host needs besides torch (pip requirement lines): the archive's requirements.txt
    requirements: ClassVar[tuple[str, ...]] = ()
    #: decoding one request costs milliseconds (an image, a clip): with more than one torch thread, a batch's
    #: requests are decoded side by side (Pillow, torch and soundfile let go of the GIL), not one after another
    heavy_decode: ClassVar[bool] = False

    def __init__(self, options: Any, model: ModelOptions, model_dir: Path) -> None:
        self.options = options
        self.model_options = model
        self.model_dir = Path(model_dir)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input's shape as the model takes it: ``model.sample_shape`` without the batch."""
        return tuple(self.model_options.sample_shape[1:])

    @classmethod
    def check(cls, options: Any, model: ModelOptions) -> None:
        """Refuse options that cannot work with ``model`` (raise ConfigError naming the key); none here."""

    @classmethod
    def model_inputs(cls, options: Any, model: ModelOptions) -> dict[str, torch.Tensor]:
        """Named sample inputs, in the order the model's forward takes them: a batch of ``model.sample_shape``.
        The smoke test at load, the archiver's checks and the ONNX/torch.export exports feed these."""
        return {"input": torch.zeros(model.sample_shape)}

    @classmethod
    def dynamic_dims(cls, options: Any, model: ModelOptions) -> dict[int, tuple[str, int]]:
        """Dimensions of every input, besides the batch, that vary between batches: {dim: (name, largest)}.
        None here: every row has the shape of ``model.sample_shape``."""
        return {}

    @classmethod
    def input_names(cls, parameters: Callable[[], Sequence[str]]) -> tuple[str, ...] | None:
        """The model's input names, in order, for the archive's ``model.inputs``, from ``parameters()`` (the
        names its forward takes; calling it imports the model file). None here: the model takes one input."""
        return None

    def setup(self, sample_outputs: torch.Tensor) -> None:
        """Called once the model loaded and ran its sample: read what the answers need (class names...).
        Raise ModelLoadError when the archive's files do not fit the model's outputs."""

    # -- requests in ---------------------------------------------------------------
    def decode(self, request: Request) -> Decoded:
        """This handler's own request format into rows; raise InvalidInput naming what is wrong."""
        raise NotImplementedError(f"{type(self).__name__} does not define decode(request)")

    def decode_instances(self, values: Sequence[Any] | torch.Tensor, request: Request) -> Decoded:
        """A KServe v1 request's ``instances``, or a v2 request's tensor (numbers: a tensor whose first
        dimension runs over the inputs; BYTES: its elements), into rows."""
        return Decoded(torch.stack([self.decode_instance(v.tolist() if isinstance(v, torch.Tensor) else v) for v in values]))

    def decode_instance(self, value: Any) -> torch.Tensor:
        """One input of a v1/v2 request: JSON numbers of the model's input shape (a ``str`` or ``bytes``
        element of a v2 BYTES tensor is refused here; handlers of text or files take them)."""
        if isinstance(value, (str, bytes, bytearray)):
            raise InvalidInput(f"{type(self).__name__} takes numbers of shape {list(self.input_shape)}, not text or bytes")
        return parse_array(value, self.input_shape, "instance")

    def instance_of(self, inputs: torch.Tensor) -> Any:
        """The numeric v1 instance (or v2 row) that decodes to the model input ``inputs``: what tools send to
        check a served model against data (``ts-gpu-check --data``). Here the numbers themselves."""
        return inputs.tolist()

    def collate(self, items: Sequence[Decoded]) -> Inputs:
        """The model's inputs for the good requests of one batch, rows in request order: here their rows, concatenated."""
        return (torch.cat([item.rows for item in items]) if len(items) > 1 else items[0].rows,)

    def sample_instance(self, seed: int) -> Any:
        """A request input for tools when a model input cannot be turned back into one (``instance_of`` refuses):
        here seeded random numbers of the input shape."""
        return self.instance_of(torch.rand(self.input_shape, generator=torch.Generator().manual_seed(seed)))

    # -- answers out -----------------------------------------------------------------
    def encode_rows(self, outputs: torch.Tensor, item: Decoded) -> list[Any]:
        """One JSON value per output row (here the numbers themselves); every protocol's answer is made of these."""
        return outputs.tolist()

    def encode(self, item: Decoded, outputs: torch.Tensor) -> Any:
        """This handler's own answer: ``{"predictions": ...}``, one value, or one per row."""
        rows = self.encode_rows(outputs, item)
        return {"predictions": rows[0] if item.single else rows}

    def answer_extras(self, item: Decoded) -> dict[str, Any]:
        """Keys a KServe v1 answer carries besides ``predictions`` (a text handler's ``truncated``); none here."""
        return {}

    def tensor_outputs(self, outputs: torch.Tensor, item: Decoded) -> dict[str, torch.Tensor]:
        """What a v2 client gets as numbers, by output name: the model's outputs, one row per input."""
        return {"predictions": outputs}

    def explain_rows(self, item: Decoded, attributions: torch.Tensor) -> dict[str, list[Any]]:
        """What an explanation adds to the answer, per input row: here its attributions."""
        return {"attributions": attributions.tolist()}

    def explain_target(self, outputs: torch.Tensor) -> torch.Tensor | int:
        """Which output to attribute: the predicted class for classifiers, output 0 otherwise."""
        return outputs.argmax(dim=1) if outputs.shape[1] > 1 else 0

    def attribute(self, forward: Any, module: Any, inputs: Inputs, target: torch.Tensor | int) -> torch.Tensor:
        """Attributions for ``target``: Captum's Integrated Gradients over the first input, from zeros
        (``forward`` runs the model on the device; ``module`` is the nn.Module where the format has one)."""
        from captum.attr import IntegratedGradients

        first = inputs[0].clone().requires_grad_(True)
        return IntegratedGradients(forward).attribute(first, baselines=torch.zeros_like(first), target=target,
                                                      additional_forward_args=inputs[1:] or None, n_steps=self.options.ig_steps)
