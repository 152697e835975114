"""Request validation: every bad input names its problem."""

from __future__ import annotations

import pytest
import torch

from serveready.handlers.errors import InvalidInput
from serveready.handlers.payload import decode_json, json_field, parse_rows, request_body


def test_one_row_and_many_rows_parse_to_float32() -> None:
    one = parse_rows([1, 2.5, -3], width=3, max_rows=4)
    many = parse_rows([[1, 2, 3], [4, 5, 6]], width=3, max_rows=4)
    assert one.dtype == torch.float32 and one.tolist() == [[1.0, 2.5, -3.0]]
    assert many.tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([], "'inputs' is empty"),
        ({"a": 1}, "'inputs' must be a list of 3 numbers or a list of such rows, got a JSON object"),
        ("1,2,3", "got a JSON string"),
        ([1, 2], "row 0 has 2 values, expected 3"),
        ([[1, 2, 3], [1, 2]], "row 1 has 2 values, expected 3"),
        ([1, [2], 3], "'inputs' mixes numbers and lists"),
        ([[1, 2, 3], [1, "x", 3]], 'row 1, column 1 is "x" (a JSON string), expected a number'),
        ([1, True, 3], "row 0, column 1 is true (a JSON boolean), expected a number"),
        ([1, None, 3], "row 0, column 1 is null (a JSON null), expected a number"),
        ([[1, [2], 3]], "row 0, column 1 is [2] (a JSON array), expected a number"),
        ([1, float("nan"), 3], "row 0, column 1 is NaN (a JSON number), expected a finite number"),
        ([1, 2, float("-inf")], "row 0, column 2 is -Infinity (a JSON number), expected a finite number"),
        ([1e39, 2, 3], "row 0, column 0 is 1e+39 (a JSON number), expected a finite number within float32 range"),
        ([10**400, 2, 3], "row 0, column 0 is 1000000000000000000000000000000000000... (a JSON number)"),
        ([[1, 2, 3]] * 5, "'inputs' has 5 rows, more than the limit of 4 rows per request"),
    ],
)
def test_bad_inputs_name_the_problem(inputs: object, message: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_rows(inputs, width=3, max_rows=4)
    assert message in err.value.message
    assert err.value.status == 400


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "request body is empty"),
        (b"   ", "request body is empty"),
        (b"{not json", "request body is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
        (b"\xff\xfe", "request body is not UTF-8 text"),
        (b"[" * 100000 + b"]" * 100000, "request body is not valid JSON"),
        (b'{"inputs": [' + b"9" * 5000 + b"]}", "request body is not valid JSON: Exceeds the limit (4300 digits) for integer string conversion"),
    ],
)
def test_undecodable_bodies(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as err:
        decode_json(body)
    assert message in err.value.message


def test_json_field_explains_the_expected_shape() -> None:
    with pytest.raises(InvalidInput) as err:
        json_field({"input": [1]}, "inputs", '{"inputs": [...]}')
    assert err.value.message == "request body has no 'inputs' key (keys: 'input'); expected {\"inputs\": [...]}"
    with pytest.raises(InvalidInput) as err:
        json_field([1, 2], "inputs", "{}")
    assert "must be a JSON object like {}, got a JSON array" in err.value.message


def test_request_body_prefers_body_then_a_single_upload() -> None:
    assert request_body({"body": b"x", "k": b"3"}) == b"x"
    assert request_body({"data": {"inputs": []}}) == {"inputs": []}
    assert request_body({"file": bytearray(b"{}")}) == b"{}"
    with pytest.raises(InvalidInput, match="Content-Type: application/json"):
        request_body({})
