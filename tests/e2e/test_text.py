"""End to end: the sentiment model answers texts over HTTP, refuses bad ones alone, and explains itself."""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from serveready.scripts import explain
from serveready.scripts.runinfo import RunDir, TokenKind
from tests.conftest import ROOT, sentiment_probabilities
from tests.e2e.conftest import Api
from tests.e2e.test_serve import ts_manage

REVIEW = ROOT / "docs" / "review.txt"


@pytest.fixture(scope="module")
def sentiment(server: RunDir) -> RunDir:
    done = ts_manage(server, "register", "sentiment.mar")
    assert done.returncode == 0, done.stderr
    return server


def _binary_text(element: bytes, declared: int | None = None) -> tuple[bytes, dict[str, str]]:
    size = 4 + len(element) if declared is None else declared
    header = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": size}}]}).encode()
    return header + struct.pack("<I", len(element)) + element, {"Inference-Header-Content-Length": str(len(header))}


def test_the_readme_review_and_concurrent_texts_get_the_models_answers(sentiment: RunDir, api: Api, sentiment_spec) -> None:  # noqa: ANN001
    reply = api.predict("sentiment", REVIEW.read_bytes(), content_type="text/plain")
    assert reply.status_code == 200, reply.text
    assert reply.json()["predictions"][0]["class"] == "positive"
    texts = [f"{word} film, {adjective} acting." for word in ("A great", "A dull", "An odd", "A lovely") for adjective in ("superb", "awful", "flat")]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda t: api.predict("sentiment", json.dumps({"text": t})), texts))
    answered = [[{p["index"]: p["probability"] for p in r.json()["predictions"]}[i] for i in range(2)] for r in replies]
    np.testing.assert_allclose(answered, sentiment_probabilities(sentiment_spec, texts).numpy(), rtol=1e-5, atol=1e-6)


def test_bad_texts_get_400_while_good_ones_beside_them_are_answered(sentiment: RunDir, api: Api) -> None:
    bad_binary, bad_headers = _binary_text(b"\xff\xfe")
    lying, lying_headers = _binary_text(b"a fine film", declared=10_000)
    token = {"Authorization": f"Bearer {sentiment.token(TokenKind.INFERENCE)}"}
    url = f"{sentiment.inference_url}/predictions/sentiment"
    sends = [
        (b"caf\xe9 \xff", {"Content-Type": "text/plain"}, "the body is not UTF-8 text"),
        (b'{"text": ""}', {"Content-Type": "application/json"}, "'text' is empty"),
        (b'{"text": "bad \\ud800"}', {"Content-Type": "application/json"}, "a lone surrogate"),
        (json.dumps({"inputs": ["ok"] * 65}).encode(), {"Content-Type": "application/json"}, "more than the limit of 64"),
        (json.dumps({"text": "x" * 10_001}).encode(), {"Content-Type": "application/json"}, "more than the limit of 10000"),
        (bad_binary, {"Content-Type": "application/octet-stream", **bad_headers}, "not UTF-8 text"),
        (lying, {"Content-Type": "application/octet-stream", **lying_headers}, "does not fit the body"),
    ]
    good = (b'{"text": "A lovely film."}', {"Content-Type": "application/json"}, "")
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda s: requests.post(url, data=s[0], headers={**token, **s[1]}, timeout=60), [x for bad in sends for x in (bad, good)]))
    for (body, _, message), reply in zip([x for bad in sends for x in (bad, good)], replies, strict=True):
        if message:
            assert reply.status_code == 400, (body[:40], reply.text)
            assert message in (reply.json().get("message") or reply.json().get("error")), reply.text
        else:
            assert reply.status_code == 200 and reply.json()["predictions"][0]["class"] == "positive"
    # A 100 MB line of text never reaches the worker: TorchServe's request limit (8 MiB) answers 413.
    huge = requests.post(url, data=b"great " * 17_000_000, headers={**token, "Content-Type": "text/plain"}, timeout=120)
    assert huge.status_code == 413
    assert api.predict("sentiment", b"A lovely film.", content_type="text/plain").status_code == 200


def test_explanations_over_http_and_the_text_picture(sentiment: RunDir, tmp_path: Path) -> None:
    review = tmp_path / "review.txt"
    review.write_bytes(REVIEW.read_bytes())
    result = explain.explain(sentiment, "sentiment", review)
    assert result["tokens"][0] == "[CLS]" and result["tokens"][-1] == "[SEP]" and len(result["attributions"]) == len(result["tokens"])
    strongest = result["tokens"][int(np.argmax(result["attributions"]))]
    assert strongest in {"wonderful", "terrific", "moving"}, result
    assert explain.main(["--run-dir", str(sentiment.path), str(review), "--model", "sentiment"]) == 0
    with Image.open(explain.heatmap_path(review)) as picture:
        assert picture.size[0] == 900 and picture.size[1] > 100


def test_info_prints_a_text_curl_line_that_works(sentiment: RunDir) -> None:
    import shlex
    import subprocess
    import sys

    done = subprocess.run([str(Path(sys.executable).parent / "ts-server"), "--run-dir", str(sentiment.path), "info"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    [line] = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith("curl") and line.strip().endswith("/predictions/sentiment")]
    words = shlex.split(line)
    assert "Content-Type: text/plain" in words and "@docs/review.txt" in words
    headers = dict(words[i + 1].split(": ", 1) for i, w in enumerate(words) if w == "-H")
    reply = requests.post(words[-1], data=(ROOT / "docs" / "review.txt").read_bytes(), headers=headers, timeout=30)
    assert reply.status_code == 200 and reply.json()["predictions"][0]["class"] == "positive"
    assert "ts-explain docs/review.txt --model sentiment" in done.stdout
