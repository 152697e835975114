"""Archives on a plain TorchServe host: torch, torchserve and pyyaml only (and tokenizers, which text archives need).

No numpy, no captum, no onnxruntime, no copy of this library: the environment
`make test` builds in .venv-plain. Its workers run on that environment's Python.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from serveready import load
from serveready.scripts.runinfo import RunDir
from tests.conftest import (
    RGB_HANDLER,
    ImageProject,
    VariantBuild,
    digits_model,
    digits_split,
    reference_net,
    render_digit,
    sentiment_probabilities,
    spoken_digits_model,
)
from tests.e2e.conftest import PLAIN, Api, plain_launcher, serving
from tests.e2e.test_serve import ts_manage
from tests.unit import test_audio_classifier as audio
from tests.unit import test_text_classifier as text


@pytest.fixture(scope="module")
def bert_project(tmp_path_factory: pytest.TempPathFactory) -> text.TextProject:
    """A user's BERT-style model (three inputs, a ``.logits`` output) and its WordPiece tokenizer.json, from a folder of its own."""
    return text.text_project(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def mel_project(tmp_path_factory: pytest.TempPathFactory) -> audio.AudioProject:
    """A user's log-mel audio model from a folder of its own."""
    return audio.audio_project(tmp_path_factory.mktemp("clips"), "log_mel")


@pytest.fixture(scope="module")
def plain(net_archive: Path, digits_archive: Path, sentiment_archive: Path, spoken_digits_archive: Path, variant_builds: dict[str, VariantBuild],
          rgb_project: ImageProject, bert_project: text.TextProject, mel_project: audio.AudioProject,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunDir]:
    launcher = plain_launcher()
    archives = [net_archive, digits_archive, sentiment_archive, spoken_digits_archive, rgb_project.archive, bert_project.archive, mel_project.archive]
    archives += [variant_builds[n].archive for n in ("digits_int8_static", "net_exported", "net_onnx", "sentiment_exported")]
    with serving(archives, tmp_path_factory.mktemp("plain"), torchserve=str(launcher)) as run:
        yield run


def test_the_host_really_is_plain() -> None:
    site = next((PLAIN / "lib").glob("python3*/site-packages"))
    present = {p.name.split("-")[0].lower() for p in site.iterdir()}
    assert {"torch", "torchserve", "yaml", "tokenizers"} <= present
    assert not {"numpy", "captum", "onnxruntime", "handlers", "archiver", "serveready"} & present


@pytest.mark.parametrize("name", ["net", "net_exported"])
def test_net_archives_serve(plain: RunDir, net_spec, name: str) -> None:  # noqa: ANN001
    assert ts_manage(plain, "register", f"{name}.mar").returncode == 0
    rows = np.random.default_rng(9).normal(size=(3, 10)).astype(np.float32)
    reply = Api(plain).predict(name, json.dumps({"inputs": rows.tolist()}))
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(reply.json()["predictions"], reference_net(net_spec.weights, rows), rtol=1e-5, atol=1e-5)
    assert Api(plain).predict(name, '{"inputs": [1, 2]}').json()["message"] == "row 0 has 2 values, expected 10"


@pytest.mark.parametrize("name", ["digits", "digits_int8_static"])
def test_digits_archives_serve_images_and_say_why_no_explanations(plain: RunDir, digits_spec, name: str) -> None:  # noqa: ANN001
    assert ts_manage(plain, "register", f"{name}.mar").returncode == 0
    split = digits_split()
    with torch.inference_mode():
        expected = digits_model(digits_spec.weights)(split["x_test"][:5]).argmax(dim=1).tolist()
    for ink, label in zip(split["x_test"][:5], expected, strict=True):
        reply = Api(plain).predict(name, json.dumps({"inputs": (ink[0] * 16).tolist(), "k": 1}))
        assert reply.status_code == 200 and reply.json()["predictions"][0]["index"] == label
    picture = render_digit((split["x_test"][0, 0] * 16).numpy(), (60, 60))
    assert Api(plain).predict(name, picture, content_type="image/png").status_code == 200
    explained = Api(plain).predict(name, picture, content_type="image/png", endpoint="explanations")
    assert explained.status_code == 501 and "explanations need" in explained.json()["message"]


def test_onnx_archive_says_what_the_host_lacks(plain: RunDir) -> None:
    done = ts_manage(plain, "register", "net_onnx.mar")
    assert done.returncode == 1
    assert "the worker said: this archive needs onnxruntime on the TorchServe host: pip install onnxruntime" in done.stderr
    assert "net_onnx" not in ts_manage(plain, "list").stdout


def test_an_ordinary_image_classifier_serves_photos(plain: RunDir, rgb_project: ImageProject) -> None:
    """Resize, centre crop and normalise from the config, class names from a text file, on a host without torchvision."""
    from tests.unit.test_standard_images import picture, torchvision_like

    assert ts_manage(plain, "register", "tiny.mar").returncode == 0
    sent = picture((120, 90), "RGB", "JPEG", 21)
    reply = Api(plain).predict("tiny", sent, content_type="image/jpeg")
    assert reply.status_code == 200, reply.text
    with torch.inference_mode():
        inputs = torchvision_like(sent, RGB_HANDLER["resize"][0], RGB_HANDLER["crop"][0], RGB_HANDLER["mean"], RGB_HANDLER["std"])
        expected = torch.softmax(rgb_project.model(inputs[None]), dim=1)[0]
    top = expected.topk(2)
    assert [p["class"] for p in reply.json()["predictions"]] == [["cat", "dog", "bird", "fish"][i] for i in top.indices.tolist()]
    np.testing.assert_allclose([p["probability"] for p in reply.json()["predictions"]], top.values.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["sentiment", "sentiment_exported"])
def test_text_archives_serve_what_the_model_computes_here(plain: RunDir, sentiment_spec, name: str) -> None:  # noqa: ANN001
    assert ts_manage(plain, "register", f"{name}.mar").returncode == 0
    texts = ["A wonderful, moving film.", "A boring, tedious mess that never ends."]
    reply = Api(plain).predict(name, json.dumps({"inputs": texts}))
    assert reply.status_code == 200, reply.text
    answered = [[{p["index"]: p["probability"] for p in row}[i] for i in range(2)] for row in reply.json()["predictions"]]
    np.testing.assert_allclose(answered, sentiment_probabilities(sentiment_spec, texts).numpy(), rtol=1e-5, atol=1e-6)
    plain_text = Api(plain).predict(name, texts[0].encode(), content_type="text/plain")
    assert plain_text.status_code == 200 and plain_text.json()["predictions"][0]["class"] == "positive"
    refused = Api(plain).predict(name, b"caf\xe9 \xff", content_type="text/plain")
    assert refused.status_code == 400 and refused.json()["message"] == "the body is not UTF-8 text: invalid continuation byte at byte 3"
    explained = Api(plain).predict(name, json.dumps({"text": texts[0]}), endpoint="explanations")
    assert explained.status_code == 501 and "explanations need" in explained.json()["message"]


def test_an_audio_archive_serves_any_wav_without_numpy_or_torchaudio(plain: RunDir, spoken_digits_spec) -> None:  # noqa: ANN001
    from tests.e2e.test_load import SEVEN, _spoken_features
    from tests.unit.test_audio_classifier import float_wav, tone, wav_file

    assert ts_manage(plain, "register", "spoken_digits.mar").returncode == 0
    model = spoken_digits_model(spoken_digits_spec.weights)
    for data in (SEVEN, wav_file(tone(0.7, 16000, seed=5), 16000)):
        reply = Api(plain).predict("spoken_digits", data, content_type="audio/wav")
        assert reply.status_code == 200, reply.text
        with torch.inference_mode():
            expected = torch.softmax(model(_spoken_features(data)), dim=1)[0]
        top = reply.json()["predictions"][0]
        assert top["index"] == int(expected.argmax()) and abs(top["probability"] - float(expected.max())) < 2e-3
    stereo_float = float_wav(tone(0.4, 44100, channels=2, seed=6), 44100)
    assert Api(plain).predict("spoken_digits", stereo_float, content_type="audio/wav").status_code == 200
    refused = Api(plain).predict("spoken_digits", SEVEN[:40] + b"\xff\xff\xff\x00" + SEVEN[44:100], content_type="audio/wav")
    assert refused.status_code == 400 and "the file is cut short or its header lies" in refused.json()["message"]
    flac = Api(plain).predict("spoken_digits", b"fLaC\x00\x00\x00\x22" + bytes(40), content_type="audio/flac")
    assert flac.status_code == 415 and "pip install soundfile" in flac.json()["message"]


def _in_process(archive: Path, bodies: list[tuple[bytes, str]], into: Path) -> list[dict]:
    with load(archive, into=into) as model:
        answers = [model.predict(body, content_type, {}) for body, content_type in bodies]
    assert all(a.status == 200 for a in answers), [a.body for a in answers]
    return [json.loads(a.body) for a in answers]


def _by_index(predictions: list[dict]) -> dict[int, float]:
    return {p["index"]: p["probability"] for p in predictions}


def test_a_users_bert_style_model_answers_what_it_answers_in_process(plain: RunDir, bert_project: text.TextProject, tmp_path: Path) -> None:
    """input_ids, attention_mask and token_type_ids from the user's tokenizer.json; the answer is the model's own, on either host."""
    assert ts_manage(plain, "register", "tinybert.mar").returncode == 0
    texts = ["i loved the music and the story", "dull, slow, a tedious plot " * 6]
    bodies = [(json.dumps({"inputs": texts}).encode(), "application/json"), (texts[0].encode(), "text/plain"),
              (json.dumps({"instances": texts}).encode(), "application/json")]
    here = _in_process(bert_project.archive, bodies, tmp_path / "unpacked")
    served = [Api(plain).predict("tinybert", body, content_type=content_type) for body, content_type in bodies]
    assert [r.status_code for r in served] == [200, 200, 200], [r.text for r in served]
    probabilities, _ = text.expected(bert_project, texts)
    for row, expected in zip(served[0].json()["predictions"], probabilities, strict=True):
        np.testing.assert_allclose([_by_index(row)[i] for i in range(3)], expected.numpy(), rtol=1e-5, atol=1e-6)
    for answer, local in zip(served, here, strict=True):
        assert answer.json().keys() == local.keys()
    assert served[0].json()["predictions"][1][0]["class"] == here[0]["predictions"][1][0]["class"]
    assert served[0].json().get("truncated") == here[0].get("truncated")
    for mine, theirs in ((served[0].json()["predictions"], here[0]["predictions"]), ([served[1].json()["predictions"]], [here[1]["predictions"]])):
        for a, b in zip(mine, theirs, strict=True):
            assert [p["class"] for p in a] == [p["class"] for p in b]
            np.testing.assert_allclose([p["probability"] for p in a], [p["probability"] for p in b], rtol=1e-5, atol=1e-7)
    refused = Api(plain).predict("tinybert", json.dumps({"inputs": ["fine", ""]}))
    assert refused.status_code == 400 and refused.json()["message"] == "text 1 is empty: send the text to classify"


def test_a_users_audio_model_answers_what_it_answers_in_process(plain: RunDir, mel_project: audio.AudioProject, tmp_path: Path) -> None:
    """A 44.1 kHz stereo WAV and an 8 kHz mono one: mono, resampled, log-mel in torch on a host without numpy."""
    assert ts_manage(plain, "register", "clip_log_mel.mar").returncode == 0
    clips = [(audio.tone(0.6, 44100, channels=2, seed=1), 44100), (audio.tone(0.3, 8000, seed=2), 8000)]
    bodies = [(audio.wav_file(signal, rate), "audio/wav") for signal, rate in clips]
    here = _in_process(mel_project.archive, bodies, tmp_path / "unpacked")
    for (body, content_type), local, (signal, rate) in zip(bodies, here, clips, strict=True):
        reply = Api(plain).predict("clip_log_mel", body, content_type=content_type)
        assert reply.status_code == 200, reply.text
        served = _by_index(reply.json()["predictions"])
        np.testing.assert_allclose([served[i] for i in range(3)], [_by_index(local["predictions"])[i] for i in range(3)], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose([served[i] for i in range(3)], audio.expected(mel_project, signal, rate).numpy(), rtol=2e-3, atol=1e-4)
    too_long = Api(plain).predict("clip_log_mel", audio.wav_file(audio.tone(6.0, 8000), 8000), content_type="audio/wav")
    assert too_long.status_code == 400 and too_long.json()["message"] == "audio: 6.00 s long, more than the limit of 5 s"
