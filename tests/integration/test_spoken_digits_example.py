"""The spoken_digits example trained on espeak-ng voices (examples/spoken_digits/train.py) and served by the
built-in audio classifier: the accuracy it reports is on real recordings, and the served path is the trained one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import serveready
from serveready.archiver.training import metrics_path
from tests.conftest import spoken_digits_model
from tests.unit.test_audio_classifier import numpy_log_mel

SOUNDS = Path("/usr/share/asterisk/sounds")
pytestmark = pytest.mark.skipif(not (SOUNDS / "ru" / "digits").is_dir(), reason="apt-get install asterisk-core-sounds-{en,es,fr,it,ru}-wav espeak-ng")


def _recordings() -> list[tuple[Path, int]]:
    found = []
    for language in ("en", "es", "fr", "it", "ru"):
        for path in sorted((SOUNDS / language / "digits").glob("*.wav")):
            stem = path.stem.removesuffix("n")
            if len(stem) == 1 and stem.isdigit():
                found.append((path, int(stem)))
    return found


def test_the_reported_accuracy_is_on_52_real_recordings_and_the_archive_gets_it_from_the_files(spoken_digits_spec, spoken_digits_archive: Path,  # noqa: ANN001
                                                                                             tmp_path: Path) -> None:
    metrics = json.loads(metrics_path(spoken_digits_spec.weights).read_text())
    recordings = _recordings()
    assert metrics["real_clips"] == len(recordings) == 52 and metrics["synthetic_clips"] == 3000
    assert metrics["real_accuracy"] >= 0.25  # chance is 0.10; docs/audio.md has the per-language counts
    with serveready.load(spoken_digits_archive, into=tmp_path / "unpacked") as model:
        answers = model.predict_batch([(path.read_bytes(), "audio/wav", {"X-Top-K": "1"}) for path, _ in recordings])
    right = [json.loads(a.body)["predictions"][0]["index"] == digit for a, (_, digit) in zip(answers, recordings, strict=True)]
    assert sum(right) == metrics["real_right"] and metrics["real_accuracy"] == metrics["real_right"] / len(recordings)


def test_a_served_recording_gets_what_the_model_computes_here(spoken_digits_spec, spoken_digits_archive: Path, tmp_path: Path) -> None:  # noqa: ANN001
    import wave

    from scipy.signal import resample_poly

    path = SOUNDS / "fr" / "digits" / "7.wav"
    with wave.open(str(path)) as clip:
        samples = np.frombuffer(clip.readframes(clip.getnframes()), "<i2") / 32768.0
        assert clip.getframerate() == 8000
    seven = Path(__file__).resolve().parents[2] / "docs" / "seven.wav"  # 22050 Hz: the handler resamples it
    with wave.open(str(seven)) as clip:
        spoken = resample_poly(np.frombuffer(clip.readframes(clip.getnframes()), "<i2") / 32768.0, 160, 441)
    model = spoken_digits_model(spoken_digits_spec.weights)
    with serveready.load(spoken_digits_archive, into=tmp_path / "unpacked") as served:
        for data, signal in ((path.read_bytes(), samples), (seven.read_bytes(), spoken)):
            clip = np.zeros(8000)
            clip[: min(8000, len(signal))] = signal[:8000]
            features = torch.tensor(numpy_log_mel(clip, 8000, 256, 80, 40, 20.0, 4000.0), dtype=torch.float32)[None]
            with torch.inference_mode():
                want = torch.softmax(model(features), dim=1)[0]
            answer = json.loads(served.predict(data, "audio/wav", {"X-Top-K": "10"}).body)["predictions"]
            got = torch.tensor([{p["index"]: p["probability"] for p in answer}[i] for i in range(10)])
            assert (got - want).abs().max() < 2e-3
