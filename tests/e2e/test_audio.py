"""End to end: the spoken-digits model answers audio files over HTTP, refuses bad ones alone, and explains itself."""

from __future__ import annotations

import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from serveready.scripts import explain
from serveready.scripts.runinfo import RunDir, TokenKind
from tests.conftest import ROOT, spoken_digits_model
from tests.e2e.test_load import SEVEN, _spoken_features
from tests.e2e.test_serve import ts_manage
from tests.unit.test_audio_classifier import float_wav, tone, wav_file


@pytest.fixture(scope="module")
def spoken(server: RunDir) -> RunDir:
    done = ts_manage(server, "register", "spoken_digits.mar")
    assert done.returncode == 0, done.stderr
    return server


def _post(run: RunDir, body: bytes, content_type: str = "audio/wav", endpoint: str = "predictions") -> requests.Response:
    headers = {"Authorization": f"Bearer {run.token(TokenKind.INFERENCE)}", "Content-Type": content_type}
    return requests.post(f"{run.inference_url}/{endpoint}/spoken_digits", data=body, headers=headers, timeout=120)


def test_concurrent_clips_of_any_rate_get_the_models_answers(spoken: RunDir, spoken_digits_spec) -> None:  # noqa: ANN001
    clips = [SEVEN] + [wav_file(tone(0.3 + 0.1 * i, rate, seed=i), rate) for i, rate in enumerate((8000, 11025, 16000, 22050, 44100, 48000, 8000))]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda c: _post(spoken, c), clips))
    model = spoken_digits_model(spoken_digits_spec.weights)
    for reply, clip in zip(replies, clips, strict=True):
        assert reply.status_code == 200, reply.text
        with torch.inference_mode():
            expected = torch.softmax(model(_spoken_features(clip)), dim=1)[0]
        top = reply.json()["predictions"][0]
        assert top["index"] == int(expected.argmax()) and abs(top["probability"] - float(expected.max())) < 2e-3
    assert replies[0].json()["predictions"][0]["class"] == "7"


def test_bad_audio_gets_its_status_while_good_clips_beside_it_are_answered(spoken: RunDir) -> None:
    bomb = SEVEN[:40] + struct.pack("<I", 0x7FFE0000) + bytes(16)  # a billion frames declared, 8 present
    streaming = SEVEN[:40] + struct.pack("<I", 0xFFFFFFFF) + SEVEN[44:]  # a pipe writer's placeholder size: the body decides
    eight_channels = wav_file(tone(0.2, 8000, channels=8), 8000)
    sends = [
        (b"\x00\x01 not audio", 400, "the body is not audio"),
        (SEVEN[:30], 400, "WAV: the fmt chunk is cut short"),
        (SEVEN[:40] + struct.pack("<I", 10**7) + SEVEN[44:], 400, "the file is cut short or its header lies"),
        (float_wav(np.array([[0.1], [np.nan]]), 8000), 400, "NaN or infinite"),
        (wav_file(tone(10.5, 8000), 8000), 400, "more than the limit of 10 s"),
        (eight_channels, 400, "8 channels, more than the limit of 2"),
        (wav_file(np.zeros((0, 1)), 8000), 400, "no audio frames"),
        (b"OggS" + bytes(60), 415, "OGG audio needs soundfile"),
        (bomb, 400, "the header says 1073676288 frames, the body holds 8"),
        (streaming, 200, ""),
    ]
    good = (SEVEN, 200, "")
    batch = [x for bad in sends for x in (bad, good)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda s: _post(spoken, s[0]), batch))
    for (body, status, message), reply in zip(batch, replies, strict=True):
        assert reply.status_code == status, (body[:20], reply.text)
        if message:
            assert message in reply.json()["message"], reply.text
        else:
            assert reply.json()["predictions"]
    # 100 MB of "audio" never reaches a worker: TorchServe's 8 MiB request limit answers 413.
    assert _post(spoken, b"RIFF" + bytes(100 * 2**20)).status_code == 413
    assert _post(spoken, SEVEN).status_code == 200


def test_explanations_over_http_and_the_audio_picture(spoken: RunDir, tmp_path: Path) -> None:
    clip = tmp_path / "seven.wav"
    clip.write_bytes(SEVEN)
    result = explain.explain(spoken, "spoken_digits", clip)
    assert np.array(result["attributions"]).shape == (40, 101) and np.array(result["input"]).shape == (40, 101)
    assert result["step_seconds"] == 0.01
    assert explain.main(["--run-dir", str(spoken.path), str(clip), "--model", "spoken_digits"]) == 0
    with Image.open(explain.heatmap_path(clip)) as picture:
        assert picture.size[0] == 900 and picture.size[1] > 200


def test_info_prints_an_audio_curl_line_that_works(spoken: RunDir) -> None:
    import shlex

    done = subprocess.run([str(Path(sys.executable).parent / "ts-server"), "--run-dir", str(spoken.path), "info"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    [line] = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith("curl") and line.strip().endswith("/predictions/spoken_digits")]
    words = shlex.split(line)
    assert "Content-Type: audio/wav" in words and "@docs/seven.wav" in words
    headers = dict(words[i + 1].split(": ", 1) for i, w in enumerate(words) if w == "-H")
    reply = requests.post(words[-1], data=SEVEN, headers=headers, timeout=30)
    assert reply.status_code == 200 and reply.json()["predictions"][0]["class"] == "7"
    assert "ts-explain docs/seven.wav --model spoken_digits" in done.stdout
