"""Every archive of the repo's model store served side by side by one real TorchServe: within its fidelity
bound of the fp32 model, and ``serveready.load(...).predict(...)`` answering what the worker answers, byte for byte.

One TorchServe holds all 27 archives (the trained net, digits, sentiment and spoken_digits and every variant of them), each
registered with one worker and batch size 1, as the requests are sent one at a time; the same
archives are loaded in-process. Each request (good ones in every protocol, and the bad ones a
careless client sends) is sent to both; status, content type, reason phrase and body must be the
same bytes.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml

import serveready
from serveready.handlers.host import Model
from serveready.scripts.client import Management
from serveready.scripts.runinfo import RunDir, TokenKind
from tests.conftest import VariantBuild, digits_model, digits_split, reference_net, render_digit, sentiment_probabilities, spoken_digits_model
from tests.e2e.conftest import serving
from tests.unit.test_audio_classifier import float_wav, numpy_log_mel, tone, wav_file

ROWS = np.random.default_rng(21).normal(size=(3, 10)).astype(np.float32)
INK = (digits_split()["x_test"][:3, 0] * 16).numpy()
PNG = render_digit(INK[0], (40, 40))
JPEG = render_digit(INK[1], (64, 64), "JPEG", rgb=True)


def _binary_v2(header: dict, payload: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + payload, {"Inference-Header-Content-Length": str(len(text))}


def _v2(data: list, shape: list[int], datatype: str = "FP32") -> bytes:
    return json.dumps({"id": "7", "inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}).encode()


def tabular_requests() -> list[tuple[str, bytes, str | None, dict[str, str]]]:
    row = ROWS[0].tolist()
    payload = ROWS.astype("<f4").tobytes()
    binary, headers = _binary_v2({"inputs": [{"name": "x", "shape": [3, 10], "datatype": "FP32", "parameters": {"binary_data_size": len(payload)}}]}, payload)
    return [
        ("one row", json.dumps({"inputs": row}).encode(), "application/json", {}),
        ("rows", json.dumps({"inputs": ROWS.tolist()}).encode(), "application/json; charset=utf-8", {}),
        ("json as text/plain", json.dumps({"inputs": row}).encode(), "text/plain", {}),
        ("json without a content type", json.dumps({"inputs": row}).encode(), None, {}),
        ("a row too short", b'{"inputs": [1, 2, 3]}', "application/json", {}),
        ("not json", b"{not json", "application/json", {}),
        ("not utf-8", b'{"inputs": "\xff\xfe"}', "application/octet-stream", {}),
        ("form-encoded", b'{"inputs": [1,2,3,4,5,6,7,8,9,10]}', "application/x-www-form-urlencoded", {}),
        ("a JSON list", b"[1, 2, 3]", "application/json", {}),
        ("a huge integer", b'{"inputs": [' + b"9" * 5000 + b"]}", "application/json", {}),
        ("kserve v1", json.dumps({"instances": ROWS.tolist()}).encode(), "application/json", {}),
        ("kserve v1, empty", b'{"instances": []}', "application/json", {}),
        ("v2 json", _v2(ROWS.flatten().tolist(), [3, 10]), "application/json", {}),
        ("v2 int8 out of range", _v2([300] + [0] * 9, [1, 10], "INT8"), "application/json", {}),
        ("v2 binary", binary, "application/octet-stream", headers),
        ("v2 binary cut short", binary[:-4], "application/octet-stream", headers),
    ]


def image_requests() -> list[tuple[str, bytes, str | None, dict[str, str]]]:
    b64 = base64.b64encode(PNG).decode()
    element = struct.pack("<I", len(JPEG)) + JPEG
    binary, headers = _binary_v2({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(element)}}]}, element)
    return [
        ("png", PNG, "image/png", {}),
        ("jpeg, top 5", JPEG, "image/jpeg", {"X-Top-K": "5"}),
        ("base64 in json", json.dumps({"image": b64, "k": 2}).encode(), "application/json", {}),
        ("ink counts", json.dumps({"inputs": INK[2].tolist()}).encode(), "application/json", {}),
        ("not an image", b"\x00\x01 not an image", "image/png", {}),
        ("truncated png", PNG[: len(PNG) // 2], "image/png", {}),
        ("k out of range", json.dumps({"image": b64, "k": 11}).encode(), "application/json", {}),
        ("kserve v1", json.dumps({"instances": [{"b64": b64}, INK[1].tolist()]}).encode(), "application/json", {}),
        ("v2 base64 bytes", _v2([b64], [1], "BYTES"), "application/json", {}),
        ("v2 ink counts", _v2(INK[:2].tolist(), [2, 8, 8]), "application/json", {}),
        ("v2 binary bytes", binary, "application/octet-stream", headers),
        ("v2 bad base64", _v2(["not base64!"], [1], "BYTES"), "application/json", {}),
    ]


REVIEW = "A wonderful, moving film with a terrific cast."
LONG_REVIEW = "a dull and tedious film " * 60  # more than max_length 128 tokens, fewer than max_chars


def text_requests() -> list[tuple[str, bytes, str | None, dict[str, str]]]:
    element = REVIEW.encode()
    binary, headers = _binary_v2({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + len(element)}}]},
                                 struct.pack("<I", len(element)) + element)
    bad = b"\xff not utf-8"
    bad_binary, bad_headers = _binary_v2({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + len(bad)}}]},
                                         struct.pack("<I", len(bad)) + bad)
    return [
        ("one text", json.dumps({"text": REVIEW}).encode(), "application/json", {}),
        ("text/plain", REVIEW.encode(), "text/plain", {}),
        ("texts, top 1", json.dumps({"inputs": [REVIEW, "A boring mess.", LONG_REVIEW], "k": 1}).encode(), "application/json", {}),
        ("truncated", json.dumps({"text": LONG_REVIEW}).encode(), "application/json", {}),
        ("json without a content type", json.dumps({"text": REVIEW}).encode(), None, {}),
        ("text/plain, not utf-8", b"caf\xe9 \xff", "text/plain", {}),
        ("empty text", b'{"text": " "}', "application/json", {}),
        ("a number for a text", b'{"inputs": ["fine", 3]}', "application/json", {}),
        ("a lone surrogate", b'{"text": "bad \\ud800"}', "application/json", {}),
        ("too many texts", json.dumps({"inputs": ["ok"] * 65}).encode(), "application/json", {}),
        ("too many characters", json.dumps({"text": "x" * 10_001}).encode(), "application/json", {}),
        ("k out of range", json.dumps({"text": REVIEW, "k": 3}).encode(), "application/json", {}),
        ("kserve v1", json.dumps({"instances": [REVIEW, {"text": "A boring mess."}]}).encode(), "application/json", {}),
        ("v2 bytes", _v2([REVIEW, "A boring mess."], [2], "BYTES"), "application/json", {}),
        ("v2 binary bytes", binary, "application/octet-stream", headers),
        ("v2 binary, not utf-8", bad_binary, "application/octet-stream", bad_headers),
        ("v2 numbers", _v2([1.0, 2.0], [1, 2]), "application/json", {}),
    ]


SEVEN = (Path(__file__).resolve().parents[2] / "docs" / "seven.wav").read_bytes()


def audio_requests() -> list[tuple[str, bytes, str | None, dict[str, str]]]:
    stereo = wav_file(tone(0.6, 44100, channels=2, seed=1), 44100, 24)
    b64 = base64.b64encode(SEVEN).decode()
    element = struct.pack("<I", len(stereo)) + stereo
    binary, headers = _binary_v2({"inputs": [{"name": "audio", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(element)}}]}, element)
    lying = SEVEN[:40] + struct.pack("<I", 10**7) + SEVEN[44:]
    return [
        ("wav", SEVEN, "audio/wav", {}),
        ("stereo 44.1 kHz 24-bit, top 5", stereo, "audio/wav", {"X-Top-K": "5"}),
        ("float wav in json", json.dumps({"audio": base64.b64encode(float_wav(tone(0.3, 16000, seed=2), 16000)).decode(), "k": 2}).encode(), "application/json", {}),
        ("not audio", b"\x00\x01 not audio", "audio/wav", {}),
        ("truncated wav", SEVEN[:30], "audio/wav", {}),
        ("a header that lies", lying, "audio/wav", {}),
        ("nan samples", float_wav(np.array([[0.1], [np.nan]]), 8000), "audio/wav", {}),
        ("too long", wav_file(tone(11.0, 8000), 8000), "audio/wav", {}),
        ("flac without soundfile", b"fLaC\x00\x00\x00\x22" + bytes(40), "audio/flac", {}),
        ("kserve v1", json.dumps({"instances": [{"b64": b64}, b64]}).encode(), "application/json", {}),
        ("v2 base64 bytes", _v2([b64], [1], "BYTES"), "application/json", {}),
        ("v2 binary bytes", binary, "application/octet-stream", headers),
        ("v2 numbers", _v2([1.0, 2.0], [1, 2]), "application/json", {}),
    ]


#: the requests of the corpora that must be refused (4xx); every other one is answered (200)
REFUSED = {"a row too short", "not json", "not utf-8", "form-encoded", "a JSON list", "a huge integer", "kserve v1, empty",
           "v2 int8 out of range", "v2 binary cut short", "not an image", "truncated png", "k out of range", "v2 bad base64",
           "text/plain, not utf-8", "empty text", "a number for a text", "a lone surrogate", "too many texts", "too many characters",
           "v2 binary, not utf-8", "v2 numbers", "not audio", "truncated wav", "a header that lies", "nan samples", "too long"}
#: refused as 415: a format this host has no reader for
UNSUPPORTED = {"flac without soundfile"}


def _spoken_features(data: bytes) -> torch.Tensor:
    """A 16-bit mono WAV as the spoken_digits model takes it, computed here: scipy's resample_poly to 8 kHz, 1 s, NumPy log-mel."""
    import io
    import wave

    from scipy.signal import resample_poly

    with wave.open(io.BytesIO(data)) as clip:
        rate, samples = clip.getframerate(), np.frombuffer(clip.readframes(clip.getnframes()), "<i2") / 32768.0
    g = np.gcd(rate, 8000)
    signal = resample_poly(samples, 8000 // g, rate // g) if rate != 8000 else samples
    clip = np.zeros(8000)
    clip[: min(8000, len(signal))] = signal[:8000]
    return torch.tensor(numpy_log_mel(clip, 8000, 256, 80, 40, 20.0, 4000.0), dtype=torch.float32)[None]


def corpus_of(name: str) -> list[tuple[str, bytes, str | None, dict[str, str]]]:
    if name.startswith("spoken_digits"):
        return audio_requests()
    return tabular_requests() if name.startswith("net") else text_requests() if name.startswith("sentiment") else image_requests()


@pytest.fixture(scope="module")
def everything(net_archive: Path, digits_archive: Path, sentiment_archive: Path, spoken_digits_archive: Path, variant_builds: dict[str, VariantBuild],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunDir, dict[str, Path]]]:
    archives = {"net": net_archive, "digits": digits_archive, "sentiment": sentiment_archive, "spoken_digits": spoken_digits_archive,
                **{name: b.archive for name, b in variant_builds.items()}}
    with serving(list(archives.values()), tmp_path_factory.mktemp("load")) as run:
        management = Management.from_run(run)
        with ThreadPoolExecutor(4) as pool:  # the workers start side by side (each imports torch)
            list(pool.map(lambda name: management.register(f"{name}.mar", workers=1, batch_size=1), archives))
        yield run, archives


def _served(run: RunDir, name: str, body: bytes, content_type: str | None, headers: dict[str, str], route: str) -> requests.Response:
    sent = {"Authorization": f"Bearer {run.token(TokenKind.INFERENCE)}", **headers}
    if content_type is not None:
        sent["Content-Type"] = content_type
    return requests.post(f"{run.inference_url}/{route}/{name}", data=body, headers=sent, timeout=60)


def _same(reply: requests.Response, answer: serveready.Answer, what: str) -> None:
    assert reply.status_code == answer.status, (what, reply.status_code, reply.text[:300], answer)
    assert reply.headers.get("content-type") == answer.content_type, what
    assert reply.content == answer.body, (what, reply.content[:300], answer.body[:300])
    if answer.status != 200:
        assert reply.reason == answer.reason, what


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "model_configs").glob("*.yaml")))
def test_load_answers_what_torchserve_answers(name: str, everything: tuple[RunDir, dict[str, Path]], tmp_path: Path) -> None:
    run, archives = everything
    with serveready.load(archives[name], into=tmp_path / "unpacked") as model:
        assert isinstance(model, Model) and model.name == name
        corpus = corpus_of(name)
        for what, body, content_type, headers in corpus:
            answer = model.predict(body, content_type, headers)
            _same(_served(run, name, body, content_type, headers, "predictions"), answer, what)
            assert answer.status == (400 if what in REFUSED else 415 if what in UNSUPPORTED else 200), (what, answer)
        what, body, content_type, headers = corpus[0]
        _same(_served(run, name, body, content_type, headers, "explanations"), model.explain(body, content_type, headers), f"explain {what}")
        batch = model.predict_batch([(body, content_type, headers) for _, body, content_type, headers in corpus[:4]])
        assert [a.status for a in batch] == [model.predict(b, c, h).status for _, b, c, h in corpus[:4]]


VARIANTS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "model_configs").glob("*.yaml") if "base" in yaml.safe_load(p.read_text()))
FIDELITY_ROWS = np.random.default_rng(7).normal(size=(16, 10)).astype(np.float32)
FIDELITY_IMAGES = digits_split()["x_test"][:8]
FIDELITY_TEXTS = [REVIEW, "A boring, tedious mess.", "It has a few good scenes but the plot makes no sense.", LONG_REVIEW]


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_serves_within_its_bound(name: str, variant_builds: dict[str, VariantBuild], everything: tuple[RunDir, dict[str, Path]],
                                         net_spec, digits_spec, sentiment_spec, spoken_digits_spec) -> None:  # noqa: ANN001
    """The same request to the variant and to its fp32 model computed here: within the variant's max_abs_diff."""
    run, _ = everything
    build = variant_builds[name]
    bound = build.spec.fidelity.max_abs_diff
    assert bound is not None, f"{name}.yaml sets no fidelity.max_abs_diff: nothing to hold it to"
    if build.row["base"] == "spoken_digits":
        model = spoken_digits_model(spoken_digits_spec.weights)
        for data in (SEVEN, wav_file(tone(0.8, 8000, seed=3), 8000), wav_file(tone(0.5, 16000, seed=4), 16000)):
            reply = _served(run, name, data, "audio/wav", {"X-Top-K": "10"}, "predictions")
            assert reply.status_code == 200, reply.text
            with torch.inference_mode():
                expected = torch.softmax(model(_spoken_features(data)), dim=1)[0].numpy()
            answered = {p["index"]: p["probability"] for p in reply.json()["predictions"]}
            assert np.abs(np.array([answered[i] for i in range(10)]) - expected).max() <= bound + 2e-3  # + NumPy's front end against torch's
    elif build.row["base"] == "sentiment":
        reply = _served(run, name, json.dumps({"inputs": FIDELITY_TEXTS}).encode(), "application/json", {}, "predictions")
        assert reply.status_code == 200, reply.text
        answered = [[{p["index"]: p["probability"] for p in row}[i] for i in range(2)] for row in reply.json()["predictions"]]
        assert np.abs(np.array(answered) - sentiment_probabilities(sentiment_spec, FIDELITY_TEXTS).numpy()).max() <= bound
    elif build.row["base"] == "net":
        reply = _served(run, name, json.dumps({"inputs": FIDELITY_ROWS.tolist()}).encode(), "application/json", {}, "predictions")
        assert reply.status_code == 200, reply.text
        assert np.abs(np.array(reply.json()["predictions"]) - reference_net(net_spec.weights, FIDELITY_ROWS)).max() <= bound
    else:
        with torch.inference_mode():
            fp32 = torch.softmax(digits_model(digits_spec.weights)(FIDELITY_IMAGES), dim=1).numpy()
        for image, expected in zip(FIDELITY_IMAGES, fp32, strict=True):
            reply = _served(run, name, json.dumps({"inputs": (image[0] * 16).tolist(), "k": 10}).encode(), "application/json", {}, "predictions")
            assert reply.status_code == 200, reply.text
            answered = {p["index"]: p["probability"] for p in reply.json()["predictions"]}
            assert np.abs(np.array([answered[i] for i in range(10)]) - expected).max() <= bound
