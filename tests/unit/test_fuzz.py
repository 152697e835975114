"""Property-based fuzzing of the handlers' request parsing, through TorchServe's own Context and in-process.

Whatever a careless or hostile client sends (any JSON value, as TorchServe hands it over after
decoding application/json; any byte string; anything that starts like an image), its request
gets a prediction or a 4xx with a message, never a 5xx; the good request beside it in the same
batch is answered as usual, and ``handle`` never raises (which would fail the whole batch).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import served

# Derandomized: CI runs the same 300 examples each time (a new find must not fail an unrelated change);
# explore with FUZZ_EXAMPLES=5000 pytest tests/unit/test_fuzz.py (random examples, a new seed each run).
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None, derandomize="FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=12) | st.dictionaries(st.sampled_from(["inputs", "image", "k", "x", ""]) | st.text(max_size=6), inner, max_size=4),
    max_leaves=80,
)
#: documents shaped like ours, with anything inside
our_shape = st.fixed_dictionaries({"inputs": json_values}, optional={"k": json_values, "image": json_values})
#: numeric grids of odd shapes and values (NaN, inf, huge, negative)
grids = st.lists(st.lists(st.floats() | st.integers(min_value=-(10**30), max_value=10**30), max_size=12), max_size=12)
image_heads = st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP", b"II*\x00", b"{", b" {"])


@st.composite
def pictures(draw: st.DrawFn) -> bytes:
    """Real images of odd sizes and modes, some cut short."""
    mode = draw(st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I", "F", "CMYK"]))
    size = (draw(st.integers(1, 300)), draw(st.integers(1, 300)))
    fmt = draw(st.sampled_from(["PNG", "TIFF", "GIF", "BMP"]))
    buffer = io.BytesIO()
    try:
        Image.new(mode, size, draw(st.integers(0, 255))).save(buffer, fmt)
    except (OSError, ValueError, KeyError):
        Image.new("L", size).save(buffer, "PNG")
    data = buffer.getvalue()
    return data[: draw(st.integers(1, len(data)))] if draw(st.booleans()) else data


bodies = (
    json_values
    | st.deferred(lambda: v2_bodies)
    | our_shape
    | st.fixed_dictionaries({"inputs": grids})
    | st.binary(max_size=300)
    | st.builds(lambda head, tail: head + tail, image_heads, st.binary(max_size=200))
    | pictures()
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.text(max_size=50).map(str.encode)
)


def _check_batch(handler: Any, context: Any, fuzzed: Any, good: Any) -> None:
    for idx in range(2):  # the context is reused between examples
        context.set_response_status(200, "OK", idx)
    answers = handler.handle([{"body": fuzzed}, {"body": good}], context)
    assert len(answers) == 2
    status = context.get_response_status(0)[0] or 200
    body = answers[0]
    assert status == 200 or 400 <= status < 500, (status, body)
    if status != 200:
        document = json.loads(body)
        message = document["error"] if set(document) == {"error"} else document["message"]  # v2's error shape, or ours
        assert isinstance(message, str) and message
    assert (context.get_response_status(1)[0] or 200) == 200, answers[1]
    assert "predictions" in json.loads(answers[1])


v2_bodies = st.fixed_dictionaries({"inputs": st.lists(st.dictionaries(st.sampled_from(["name", "shape", "datatype", "data", "parameters"]),
                                                                      json_values | st.sampled_from(["FP32", "BYTES", "INT64", "BOOL"]),
                                                                      max_size=5), min_size=1, max_size=2)},
                                  optional={"id": json_values, "instances": json_values})


@pytest.fixture
def tabular(net_dir: Path) -> tuple[Any, Any]:
    return served(net_dir, 2)


@pytest.fixture
def digits(digits_dir: Path) -> tuple[Any, Any]:
    return served(digits_dir, 2)


@FUZZ
@given(body=bodies)
def test_tabular_answers_any_request_with_a_prediction_or_a_4xx(tabular: tuple[Any, Any], body: Any) -> None:
    _check_batch(*tabular, body, {"inputs": [0.1] * 10})


@FUZZ
@given(body=bodies)
def test_digits_answer_any_request_with_a_prediction_or_a_4xx(digits: tuple[Any, Any], body: Any) -> None:
    _check_batch(*digits, body, {"inputs": [[0] * 8] * 8})


content_types = st.sampled_from([None, "application/json", "application/json; charset=utf-8", "text/plain", "image/png", "image/jpeg",
                                 "application/octet-stream", "application/x-www-form-urlencoded", "multipart/form-data; boundary=X",
                                 "APPLICATION/JSON", ""])
headers = st.dictionaries(st.sampled_from(["X-Top-K", "Inference-Header-Content-Length", "explain", "Content-Type"]),
                          st.text(max_size=8) | st.integers(-5, 500).map(str), max_size=3)
raw_bodies = bodies.map(lambda b: b if isinstance(b, (bytes, bytearray)) else json.dumps(b).encode())


@pytest.fixture(scope="module")
def loaded(net_archive: Path, digits_archive: Path) -> Any:
    import serveready

    models = [serveready.load(net_archive, threads=0), serveready.load(digits_archive, threads=0)]
    yield models
    for model in models:
        model.close()


@FUZZ
@given(body=raw_bodies, content_type=content_types, sent=headers, which=st.integers(0, 1))
def test_in_process_any_request_gets_an_answer_or_a_4xx(loaded: Any, body: bytes, content_type: str | None, sent: dict, which: int) -> None:
    """serveready.load as a careless or hostile client meets it: any bytes, content type and headers."""
    model = loaded[which]
    good = {"inputs": [0.1] * 10} if which == 0 else {"inputs": [[0] * 8] * 8}
    answer, other = model.predict_batch([(body, content_type, sent), (good, None)])
    assert answer.status == 200 or 400 <= answer.status < 500, (answer, body[:80])
    if answer.status != 200:
        document = json.loads(answer.body)
        message = document["error"] if set(document) == {"error"} else document["message"]
        assert isinstance(message, str) and message and answer.reason == message
    assert other.status == 200 and "predictions" in other.json()


#: any Unicode text, lone surrogates included (JSON can carry them as \ud800 escapes)
any_text = st.text(st.characters(exclude_categories=()), max_size=60)
text_bodies = (
    bodies
    | st.fixed_dictionaries({"text": any_text | json_values}, optional={"k": json_values})
    | st.fixed_dictionaries({"inputs": st.lists(any_text | json_values, max_size=6)}, optional={"k": json_values})
    | st.fixed_dictionaries({"instances": st.lists(any_text | st.fixed_dictionaries({"text": any_text | json_values}), max_size=6)})
    | any_text.map(lambda t: t.encode("utf-8", "surrogatepass"))
)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import serveready
    from tests.unit.test_text_classifier import text_project

    project = text_project(tmp_path_factory.mktemp("fuzz-text"))
    model = serveready.load(project.archive, threads=0, into=tmp_path_factory.mktemp("fuzz-text-unpacked"))
    yield model
    model.close()


@FUZZ
@given(body=text_bodies, content_type=content_types, sent=headers)
def test_text_classifier_answers_any_request_with_a_prediction_or_a_4xx(text_model: Any, body: Any, content_type: str | None, sent: dict) -> None:
    raw = body if isinstance(body, (bytes, bytearray)) else json.dumps(body).encode()
    answer, other = text_model.predict_batch([(raw, content_type, sent), (b'{"text": "a wonderful film"}', "application/json")])
    assert answer.status == 200 or 400 <= answer.status < 500, (answer, raw[:80])
    if answer.status != 200:
        document = json.loads(answer.body)
        message = document["error"] if set(document) == {"error"} else document["message"]
        assert isinstance(message, str) and message and answer.reason == message
    assert other.status == 200 and "predictions" in other.json()
