"""One request as a host hands it over, and its body turned into validated numeric rows.

Only the standard library and torch: a TorchServe host need not have numpy.
TorchServe hands each request to the handler as a dict of fields whose ``body`` (or
``data``) is bytes, text (``text/*``), or JSON already decoded by the worker when the
client said ``Content-Type: application/json``; :class:`Request` wraps that dict and the
request's headers, for every host alike. Everything here raises :class:`InvalidInput`
with a message that names the problem.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any

import torch

from .errors import InvalidInput

_UNSET = object()

_BODY_KEYS = ("body", "data")
_FLOAT32_MAX = torch.finfo(torch.float32).max
_NUMBER_TYPES = {int, float}  # exactly: bool is an int subclass, and `true` is not a number
#: up to this many values a request's numbers are range-checked in Python, beyond it in torch
_PYTHON_CHECK_MAX = 256


class Request:
    """One request: its fields as TorchServe gives them (``body``, or form fields), its headers, and whether
    it asks for an explanation (``/explanations``, ``:explain``).

    Header names are lower-case. :meth:`json` decodes the body once, whichever code asks first.
    """

    __slots__ = ("fields", "headers", "explain", "_document")

    def __init__(self, fields: Mapping[str, Any], headers: Mapping[str, str] | None = None, explain: bool = False) -> None:
        self.fields = fields
        self.headers: Mapping[str, str] = headers if headers is not None else {}
        self.explain = explain
        self._document: Any = _UNSET

    @property
    def body(self) -> Any:
        """The body: bytes, text, or the JSON the host already decoded (see :func:`request_body`)."""
        return request_body(self.fields)

    def json(self) -> Any:
        """The body as JSON (decoded here unless the host did), or InvalidInput saying why it is not."""
        if self._document is _UNSET:
            self._document = decode_json(self.body)
        return self._document

    def looks_like_json(self) -> bool:
        """True when the body is JSON already decoded, or bytes/text that open with ``{``."""
        body = self.body
        if isinstance(body, (dict, list)):
            return True
        return isinstance(body, (bytes, bytearray, str)) and body[:64].lstrip()[:1] in (b"{", "{")


def request_body(request: Mapping[str, Any]) -> Any:
    """Return the raw body of one TorchServe request (bytes, str or decoded JSON).

    TorchServe also passes query-string and form fields as entries of the
    request, so ``body``/``data`` win, then a single uploaded file.
    """
    for key in _BODY_KEYS:
        if key in request and request[key] is not None:
            return request[key]
    uploads = [v for v in request.values() if isinstance(v, (bytes, bytearray)) and v]
    if len(uploads) == 1:  # multipart upload: one file under its own field name
        return uploads[0]
    raise InvalidInput(
        "request has no body that can be read: send JSON with Content-Type: application/json "
        "(curl: -H 'Content-Type: application/json' -d '{\"inputs\": [...]}'); form-encoded bodies are not read"
    )


def decode_json(body: Any) -> Any:
    """Decode a JSON body unless the worker already did."""
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidInput(f"request body is not UTF-8 text: {err.reason} at byte {err.start}") from None
    if not isinstance(body, str):
        return body
    if not body.strip():
        raise InvalidInput("request body is empty: send JSON such as {\"inputs\": [...]}")
    try:
        return json.loads(body)
    except json.JSONDecodeError as err:
        raise InvalidInput(f"request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise InvalidInput("request body is not valid JSON: nested too deeply") from None
    except ValueError as err:  # Python's cap on integer digits (4300), which json.loads enforces
        raise InvalidInput(f"request body is not valid JSON: {str(err).split(';')[0]}") from None


def decode_base64(text: object, what: str = "'image'", kind: str = "PNG or JPEG") -> bytes:
    """The bytes of a base64 string (``data:`` URL prefixes allowed); ``what`` names it in messages, ``kind`` the file it should be."""
    if not isinstance(text, str) or not text:
        raise InvalidInput(f"{what} must be a non-empty base64 string of a {kind} file")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidInput(f"{what} is not valid base64: {err}") from None


def json_field(document: Any, key: str, example: str) -> Any:
    """Return ``document[key]``, or explain what the body should have looked like."""
    if not isinstance(document, dict):
        raise InvalidInput(f"request body must be a JSON object like {example}, got a JSON {_json_type(document)}")
    if key not in document:
        present = ", ".join(sorted(map(repr, document))) or "none"
        raise InvalidInput(f"request body has no {key!r} key (keys: {present}); expected {example}")
    return document[key]


def parse_rows(inputs: Any, width: int, max_rows: int) -> torch.Tensor:
    """Validate ``inputs`` (one row or a list of rows) into a float32 tensor of shape (n, width).

    Args:
        inputs: the decoded ``inputs`` value: ``[x1, ..., xw]`` or ``[[...], [...]]``.
        width: the number of features each row must have.
        max_rows: the largest number of rows one request may carry.

    Raises:
        InvalidInput: naming the first row and column that is wrong.
    """
    if not isinstance(inputs, list):
        raise InvalidInput(f"'inputs' must be a list of {width} numbers or a list of such rows, got a JSON {_json_type(inputs)}")
    if not inputs:
        raise InvalidInput(f"'inputs' is empty: send one row of {width} numbers or a list of rows")
    # The commonest request, one short row of numbers, in one pass (its errors take the general path below).
    if len(inputs) == width <= _PYTHON_CHECK_MAX and {type(v) for v in inputs} <= _NUMBER_TYPES \
            and all(-_FLOAT32_MAX <= v <= _FLOAT32_MAX for v in inputs):
        return torch.tensor([inputs], dtype=torch.float32)
    kinds = {isinstance(item, list) for item in inputs}
    if kinds == {False}:
        rows = [inputs]
    elif kinds == {True}:
        rows = inputs
    else:
        raise InvalidInput("'inputs' mixes numbers and lists: send one row of numbers or a list of rows, not both")
    if len(rows) > max_rows:
        raise InvalidInput(f"'inputs' has {len(rows)} rows, more than the limit of {max_rows} rows per request")
    for r, row in enumerate(rows):
        if len(row) != width:
            raise InvalidInput(f"row {r} has {len(row)} values, expected {width}")
    # Hot path: one pass over the value types, one tensor, one range check; only a
    # request that fails them pays for the walk that names the bad value. A few values are
    # checked in Python (a torch isfinite().all() costs ~11 us whatever the size), many in torch.
    if {type(value) for row in rows for value in row} <= _NUMBER_TYPES:
        if len(rows) * width <= _PYTHON_CHECK_MAX:
            if all(-_FLOAT32_MAX <= value <= _FLOAT32_MAX for row in rows for value in row):
                return torch.tensor(rows, dtype=torch.float32)
        else:
            try:
                tensor = torch.tensor(rows, dtype=torch.float32)  # beyond float32's range becomes inf
            except (OverflowError, RuntimeError):  # an integer too large for any float
                tensor = None
            if tensor is not None and bool(tensor.isfinite().all()):
                return tensor
    return torch.tensor([[_number(value, f"row {r}, column {c}") for c, value in enumerate(row)] for r, row in enumerate(rows)], dtype=torch.float32)


def parse_array(inputs: Any, shape: tuple[int, ...], name: str = "'inputs'") -> torch.Tensor:
    """Validate nested lists of exactly ``shape`` (e.g. channels x height x width) into a float32 tensor.

    Raises:
        InvalidInput: naming the first index whose list has the wrong length or whose value is not a number.
    """
    flat: list[float] = []

    def walk(value: Any, depth: int, where: str) -> None:
        if depth == len(shape):
            flat.append(_number(value, where))
            return
        if not isinstance(value, list) or len(value) != shape[depth]:
            got = f"{len(value)} items" if isinstance(value, list) else f"a JSON {_json_type(value)}"
            raise InvalidInput(f"{where} must be a list of {shape[depth]} items (shape {list(shape)}), got {got}")
        for i, item in enumerate(value):
            walk(item, depth + 1, f"{where}[{i}]")

    walk(inputs, 0, name)
    return torch.tensor(flat, dtype=torch.float32).reshape(shape)


def _number(value: Any, where: str) -> float:
    # bool is an int subclass in Python, but `true` is not a feature value.
    if type(value) not in (int, float):
        raise InvalidInput(f"{where} is {_describe(value)}, expected a number")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not math.isfinite(number) or abs(number) > _FLOAT32_MAX:
        raise InvalidInput(f"{where} is {_describe(value)}, expected a finite number within float32 range")
    return number


def _describe(value: Any) -> str:
    text = json.dumps(value) if _json_type(value) != "value" else repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} (a JSON {_json_type(value)})"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "value"
