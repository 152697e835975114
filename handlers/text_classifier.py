"""Text classifiers (``handler: {entry: text_classifier}``): texts in, each text's top-k classes out.

The model follows the Hugging Face convention, so a user's own BERT-style module packs as it is:

    forward(input_ids: LongTensor[batch, seq], attention_mask: LongTensor[batch, seq]
            [, token_type_ids: LongTensor[batch, seq]]) -> logits[batch, classes]

(``token_type_ids`` is passed when the forward takes it; an output with ``.logits``, a Hugging
Face ``ModelOutput``, is read through it). Texts are tokenized with the archive's
``tokenizer.json`` (the ``tokenizers`` library: its normalizer, pre-tokenizer and
post-processor apply as the file says), the whole batch in one call, truncated to
``max_length`` tokens and padded to the batch's longest with the tokenizer's pad id.

Request:
    a text/plain body (UTF-8)                           curl -H 'Content-Type: text/plain' --data-binary @review.txt
    {"text": "...", "k": 2}                             one text
    {"inputs": ["...", "..."], "k": 2}                  several: one answer per text, in order
    an ``X-Top-K: 2`` header also sets k
Response: {"predictions": [{"class": "positive", "index": 1, "probability": 0.93}, ...]}  top k;
    several texts: {"predictions": [[...], [...]]}; a text cut at max_length adds "truncated": true
    (several: a list with one flag per text).
/explanations adds, per text, "tokens", "offsets" (each token's characters in the text) and
"attributions" (one per token, for the predicted class: Layer Integrated Gradients over
``embedding_layer``, summed over the embedding; they add up to the class's logit against an
all-padding text that keeps the special tokens).

KServe v1: {"instances": ["...", {"text": "..."}]} -> {"predictions": [top k per text]}.
Open Inference Protocol v2: one BYTES input of shape [n] (UTF-8 strings in JSON, length-prefixed
bytes in the binary extension) -> output "probabilities", FP32 [n, classes].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from .base import BatchHandler, Decoded
from .config import ModelOptions, TextOptions
from .errors import ConfigError, ExplanationsUnavailable, InvalidInput, ModelLoadError
from .inputs import Inputs
from .labels import class_names, requested_k, top_classes
from .payload import Request

#: Raw text bodies carry k in this header (TorchServe 0.12 drops query strings of predictions).
TOP_K_HEADER = "x-top-k"
#: What the forward takes when the archive names nothing else: the Hugging Face order.
DEFAULT_INPUTS = ("input_ids", "attention_mask")
KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TOKENIZERS_HINT = ("this archive needs the tokenizers library on the serving host: pip install tokenizers "
                   "(TorchServe installs the archive's requirements.txt itself when started with install_py_dep_per_model=true)")


def input_names(parameters: Sequence[str]) -> tuple[str, ...]:
    """The inputs a text model's forward takes, from its parameter names: ``input_ids`` and
    ``attention_mask``, then ``token_type_ids`` when it takes that too."""
    return DEFAULT_INPUTS + (("token_type_ids",) if "token_type_ids" in parameters else ())


class TextClassifierHandler(BatchHandler):
    """Texts in, each text's top-k classes with probabilities out."""

    options_type: Any = TextOptions
    options: TextOptions
    #: what the archive needs on the serving host besides torch (written to its requirements.txt)
    requirements: ClassVar[tuple[str, ...]] = ("tokenizers>=0.15",)

    def __init__(self, options: TextOptions, model: ModelOptions, model_dir: Path) -> None:
        super().__init__(options, model, model_dir)
        self.max_instances = options.max_texts  # type: ignore[misc]  (a v1/v2 request's limit, per archive)
        self.names_in = tuple(model.inputs or DEFAULT_INPUTS)

    @classmethod
    def check(cls, options: TextOptions, model: ModelOptions) -> None:
        shape = list(model.sample_shape)
        if len(shape) != 2:
            raise ConfigError(f"model.sample_shape must be [batch, sequence] for text classifiers, got {shape}")
        if shape[1] > options.max_length:
            raise ConfigError(f"model.sample_shape {shape} is longer than handler.max_length {options.max_length}")
        unknown = [n for n in model.inputs or () if n not in KNOWN_INPUTS]
        if unknown:
            raise ConfigError(f"model.inputs names {unknown[0]!r}; a text model takes {', '.join(KNOWN_INPUTS)}")

    @classmethod
    def model_inputs(cls, options: TextOptions, model: ModelOptions) -> dict[str, torch.Tensor]:
        shape = tuple(model.sample_shape)
        samples = {"input_ids": torch.zeros(shape, dtype=torch.long), "attention_mask": torch.ones(shape, dtype=torch.long),
                   "token_type_ids": torch.zeros(shape, dtype=torch.long)}
        return {name: samples[name] for name in model.inputs or DEFAULT_INPUTS}

    @classmethod
    def dynamic_dims(cls, options: TextOptions, model: ModelOptions) -> dict[int, tuple[str, int]]:
        return {1: ("sequence", options.max_length)}

    @classmethod
    def input_names(cls, parameters: Callable[[], Sequence[str]]) -> tuple[str, ...]:
        return input_names(parameters())

    def setup(self, sample_outputs: torch.Tensor) -> None:
        self.classes = int(sample_outputs.shape[-1])
        self.names = class_names(self.options, self.model_dir, self.classes)
        self.tokenizer = load_tokenizer(self.model_dir / self.options.tokenizer, self.options.max_length)
        padding = self.tokenizer.padding or {}
        self.pad_id = int(padding.get("pad_id", _pad_id(self.tokenizer)))
        # Pad to each batch's longest, with the file's pad token and side, whatever length the file says.
        self.tokenizer.enable_padding(direction=padding.get("direction", "right"), pad_id=self.pad_id,
                                      pad_type_id=int(padding.get("pad_type_id", 0)),
                                      pad_token=padding.get("pad_token") or self.tokenizer.id_to_token(self.pad_id) or "[PAD]")
        special = [i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special]
        self.special_ids = torch.tensor(sorted(special), dtype=torch.long)

    # -- requests ------------------------------------------------------------------
    def decode(self, request: Request) -> Decoded:
        body = request.body
        k = request.headers.get(TOP_K_HEADER)
        if isinstance(body, (dict, list)) or (request.looks_like_json() and not _is_text(request)):
            document = request.json()
            if not isinstance(document, dict) or not ({"text", "inputs"} & set(document)):
                raise InvalidInput('send a text/plain body, or JSON {"text": "..."} or {"inputs": ["...", ...]}')
            k = document.get("k", k)
            if "text" in document:
                texts, single = [self._text(document["text"], "'text'")], True
            else:
                texts, single = self._texts(document["inputs"]), False
        else:
            texts, single = [self._text(body, "the body")], True
        return Decoded(texts, {"k": requested_k(k, self.options.top_k, self.classes)}, single=single)

    def decode_instances(self, values: Sequence[Any] | torch.Tensor, request: Request) -> Decoded:
        if isinstance(values, torch.Tensor):
            raise InvalidInput("a text model takes texts: send a BYTES tensor of UTF-8 strings, not numbers")
        texts = [self._text(v["text"] if isinstance(v, dict) and "text" in v else v, f"instance {i}") for i, v in enumerate(values)]
        return Decoded(texts, {"k": requested_k(request.headers.get(TOP_K_HEADER), self.options.top_k, self.classes)})

    def decode_instance(self, value: Any) -> Any:
        return self._text(value, "instance")

    def instance_of(self, inputs: torch.Tensor) -> Any:
        """The text whose tokens are ``inputs`` (one row of input_ids), as the tokenizer decodes it."""
        ids = inputs[0] if isinstance(inputs, tuple) else inputs
        return self.tokenizer.decode([int(i) for i in ids.tolist() if int(i) != self.pad_id])

    def sample_instance(self, seed: int) -> Any:
        """A text of eight of the tokenizer's own tokens (seeded): random ids of the input shape are mostly padding."""
        ids = torch.randint(0, self.tokenizer.get_vocab_size(), (8,), generator=torch.Generator().manual_seed(seed)).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip() or "a sample text"

    def _texts(self, value: Any) -> list[str]:
        if not isinstance(value, list) or not value:
            raise InvalidInput(f"'inputs' must be a non-empty list of texts (strings), got {_kind(value)}")
        if len(value) > self.options.max_texts:
            raise InvalidInput(f"'inputs' has {len(value)} texts, more than the limit of {self.options.max_texts} per request")
        return [self._text(v, f"text {i}") for i, v in enumerate(value)]

    def _text(self, value: Any, where: str) -> str:
        """One text, checked: a non-empty UTF-8 string of at most max_chars characters."""
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError as err:
                raise InvalidInput(f"{where} is not UTF-8 text: {err.reason} at byte {err.start}") from None
        if not isinstance(value, str):
            raise InvalidInput(f"{where} must be a text (a string), got {_kind(value)}")
        if len(value) > self.options.max_chars:
            raise InvalidInput(f"{where} has {len(value)} characters, more than the limit of {self.options.max_chars}")
        if not value.strip():
            raise InvalidInput(f"{where} is empty: send the text to classify")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate from a JSON "\\ud800" escape: no text has one
            raise InvalidInput(f"{where} is not valid Unicode: a lone surrogate at character {err.start}") from None
        return value

    # -- the batch -----------------------------------------------------------------
    def collate(self, items: Sequence[Decoded]) -> Inputs:
        texts = [text for item in items for text in item.rows] if len(items) > 1 else items[0].rows
        encodings = self.tokenizer.encode_batch(texts)
        start = 0
        for item in items:
            item.encoded = encodings[start:start + len(item.rows)]
            start += len(item.rows)
        columns = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
                   "token_type_ids": [e.type_ids for e in encodings]}
        if not columns["input_ids"][0]:  # no text made a token (a tokenizer without special tokens): one padding column
            columns = {"input_ids": [[self.pad_id]] * len(texts), "attention_mask": [[0]] * len(texts), "token_type_ids": [[0]] * len(texts)}
        return tuple(torch.tensor(columns[name], dtype=torch.long) for name in self.names_in)

    # -- answers ---------------------------------------------------------------------
    def encode_rows(self, outputs: torch.Tensor, item: Decoded) -> list[Any]:
        return top_classes(outputs, item.options["k"], self.names)

    def encode(self, item: Decoded, outputs: torch.Tensor) -> Any:
        rows = self.encode_rows(outputs, item)
        return {"predictions": rows[0] if item.single else rows, **self.answer_extras(item)}

    def answer_extras(self, item: Decoded) -> dict[str, Any]:
        """``"truncated"`` when a text was cut at max_length: true (one text), or a flag per text."""
        flags = [bool(e.overflowing) for e in item.encoded]
        if not any(flags):
            return {}
        return {"truncated": flags[0] if item.single else flags}

    def tensor_outputs(self, outputs: torch.Tensor, item: Decoded) -> dict[str, torch.Tensor]:
        return {"probabilities": torch.softmax(outputs, dim=1)}

    def attribute(self, forward: Any, module: Any, inputs: Inputs, target: torch.Tensor | int) -> torch.Tensor:
        from captum.attr import LayerIntegratedGradients

        layer = self._embedding_layer(module)
        ids, rest = inputs[0], inputs[1:]
        # The baseline: the same text with every ordinary token replaced by padding ([CLS] and [SEP] stay).
        keep = torch.isin(ids, self.special_ids.to(ids.device))
        baseline = torch.where(keep, ids, torch.full_like(ids, self.pad_id))
        try:
            attributions = LayerIntegratedGradients(forward, layer).attribute(
                ids, baselines=baseline, target=target, additional_forward_args=tuple(rest) or None, n_steps=self.options.ig_steps)
        except AssertionError as err:  # captum's own check: the layer never ran as a module
            raise ExplanationsUnavailable(f"handler.embedding_layer {self.options.embedding_layer!r} did not run as a module of this "
                                          f"{self.model_options.format} model ({err}): ask the fp32 model") from None
        per_token = attributions.sum(dim=-1)
        mask = inputs[self.names_in.index("attention_mask")] if "attention_mask" in self.names_in else torch.ones_like(ids)
        return per_token * mask.to(per_token.dtype)

    def _embedding_layer(self, module: Any) -> torch.nn.Module:
        if module is None or self.model_options.format == "exported":  # torch.export runs the layers' ops, not the layers
            raise ExplanationsUnavailable(f"text explanations attribute the model's {self.options.embedding_layer!r} layer, and this "
                                          f"archive's {self.model_options.format} model has no torch layers: ask the fp32 model")
        try:
            return module.get_submodule(self.options.embedding_layer)
        except AttributeError:
            layers = [name for name, m in module.named_modules() if isinstance(m, torch.nn.Embedding)][:5]
            have = f"its embedding layers: {', '.join(layers)}" if layers else "it has no nn.Embedding"
            raise ExplanationsUnavailable(f"handler.embedding_layer {self.options.embedding_layer!r} is not a layer of this model ({have})") from None

    def explain_rows(self, item: Decoded, attributions: torch.Tensor) -> dict[str, list[Any]]:
        tokens, offsets, values = [], [], []
        for encoding, row in zip(item.encoded, attributions, strict=True):
            kept = [i for i, m in enumerate(encoding.attention_mask) if m]
            tokens.append([encoding.tokens[i] for i in kept])
            offsets.append([list(encoding.offsets[i]) for i in kept])
            values.append([float(row[i]) for i in kept])
        return {"tokens": tokens, "offsets": offsets, "attributions": values}


def load_tokenizer(path: Path, max_length: int) -> Any:
    """The archive's ``tokenizer.json``, truncating to ``max_length`` tokens.

    Raises:
        ModelLoadError: the tokenizers library is missing on this host, or the file is not a tokenizer.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ModelLoadError(TOKENIZERS_HINT) from None
    if not path.is_file():
        raise ModelLoadError(f"handler.tokenizer {path.name} is not in the archive: add it to the config's extra_files")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises its own exception type
        raise ModelLoadError(f"handler.tokenizer {path.name} is not a Hugging Face tokenizer.json: {err}") from err
    tokenizer.enable_truncation(max_length)
    return tokenizer


def _pad_id(tokenizer: Any) -> int:
    for token in ("[PAD]", "<pad>", "<|pad|>", "<PAD>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return 0


def _is_text(request: Request) -> bool:
    return str(request.headers.get("content-type", "")).lower().startswith("text/")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
