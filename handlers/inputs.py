"""A model's inputs as one value: a tuple of tensors with the same rows, in the order its forward takes them.

A tabular or image model takes one tensor (``forward(x)``); a text model takes several
(``forward(input_ids, attention_mask)``). Everything that feeds a model (the engine, the
loaders, the archiver's checks, exports and measurements) passes :data:`Inputs`, so a model
of any arity goes through the same code. A data file's ``x_test`` is a tensor, or a mapping
of input names to tensors (:func:`as_inputs` makes either one :data:`Inputs`).

Only torch: this module travels inside every archive.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

Inputs = tuple[torch.Tensor, ...]


def as_inputs(value: torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> Inputs:
    """One tensor, a mapping of named tensors (in the forward's order) or a sequence of them, as :data:`Inputs`."""
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, Mapping):
        return tuple(value.values())
    return tuple(value)


def rows(inputs: Inputs) -> int:
    """How many rows (examples) ``inputs`` hold: the first dimension they share."""
    return int(inputs[0].shape[0])


def select(inputs: Inputs, index: Any) -> Inputs:
    """The same rows (a slice, or a tensor of indices) of every input."""
    return tuple(tensor[index] for tensor in inputs)


def chunks(inputs: Inputs, size: int) -> Iterator[Inputs]:
    """``inputs`` in consecutive chunks of at most ``size`` rows."""
    for start in range(0, rows(inputs), size):
        yield select(inputs, slice(start, start + size))


def repeat_row(inputs: Inputs, count: int) -> Inputs:
    """``count`` copies of the first row of every input (latency measurements)."""
    return tuple(tensor[:1].expand(count, *tensor.shape[1:]).contiguous() for tensor in inputs)


def logits(output: Any) -> torch.Tensor:
    """A model's output as one tensor: itself, a Hugging Face ``ModelOutput``'s ``.logits``, or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    found = getattr(output, "logits", None)
    if isinstance(found, torch.Tensor):
        return found
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the model returned {type(output).__name__}; expected a tensor, an object with .logits, or a tuple starting with one")
