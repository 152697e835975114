"""The built-in audio classifier, on a user's own models packed from folders of their own.

One model takes the waveform itself, one the library's log-mel features. Every answer is checked
against an independent computation: the WAV written with Python's ``wave`` module, read back
with NumPy, resampled with ``scipy.signal.resample_poly``, log-mel in NumPy, then the model run
here, outside the archive.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import sys
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.signal import resample_poly

import serveready
from serveready.archiver import ArchiverError, build, load_spec
from serveready.handlers.audio import Limits, log_mel, read_audio, resample

MODEL = '''"""Two small audio classifiers of a user's."""
import torch
from torch import nn


class WaveNet(nn.Module):
    """Takes [batch, samples] in [-1, 1] and computes its own features."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 64, stride=16)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x.unsqueeze(1))).mean(dim=2))


class MelNet(nn.Module):
    """Takes the library's log-mel features, [batch, n_mels, frames]."""

    def __init__(self, n_mels: int = 20, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.head = nn.Linear(6 * n_mels, classes)

    def forward(self, m):
        h = torch.relu(self.conv(m.unsqueeze(1))).mean(dim=3)
        return self.head(h.flatten(1))
'''

RATE = 8000
SAMPLES = 4000  # half a second
MEL = {"n_fft": 256, "hop_length": 80, "n_mels": 20, "f_min": 20.0, "f_max": 3800.0}
FRAMES = 1 + SAMPLES // MEL["hop_length"]  # 51
CLASSES = ("yes", "no", "maybe")


@dataclass(frozen=True)
class AudioProject:
    folder: Path
    archive: Path
    model: torch.nn.Module
    features: str


def audio_project(base: Path, features: str, handler: dict | None = None) -> AudioProject:
    folder = base / f"user-{features}"
    (folder / "models").mkdir(parents=True)
    (folder / "model_configs").mkdir()
    (folder / "models" / "audio_models.py").write_text(MODEL)
    (folder / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    namespace: dict = {}
    exec(compile(MODEL, "audio_models.py", "exec"), namespace)  # noqa: S102  (the reference model, outside the archive)
    torch.manual_seed(5)
    model = (namespace["WaveNet"]() if features == "waveform" else namespace["MelNet"](n_mels=MEL["n_mels"])).eval()
    with torch.no_grad():
        model.head.weight.mul_(30.0)
    torch.save(model.state_dict(), folder / "audio.pt")
    shape = [2, SAMPLES] if features == "waveform" else [2, MEL["n_mels"], FRAMES]
    mel = MEL if features == "log_mel" else {}
    config = {
        "name": f"clip_{features}",
        "model": {"file": "models/audio_models.py", "class": "WaveNet" if features == "waveform" else "MelNet",
                  "kwargs": {} if features == "waveform" else {"n_mels": MEL["n_mels"]}, "sample_shape": shape},
        "weights": "audio.pt",
        "extra_files": ["labels.txt"],
        "handler": {"entry": "audio_classifier", "sample_rate": RATE, "features": features, **mel, "max_seconds": 5.0, "max_channels": 2,
                    "classes_file": "labels.txt", "top_k": 3, "ig_steps": 64, **(handler or {})},
    }
    (folder / "model_configs" / f"clip_{features}.yaml").write_text(yaml.safe_dump(config))
    spec = load_spec(folder / "model_configs" / f"clip_{features}.yaml")
    return AudioProject(folder, build(spec, folder / "model_store"), model, features)


def tone(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A chirp with noise, ``[frames, channels]`` floats in [-0.8, 0.8]: something for the models to tell apart."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    base = 0.5 * np.sin(2 * np.pi * (300 + 900 * seed) * t + 2 * np.pi * 400 * t**2) + 0.1 * rng.normal(size=t.shape)
    return np.clip(np.stack([base * (1 - 0.3 * c) for c in range(channels)], axis=1), -0.8, 0.8)


def wav_file(signal: np.ndarray, rate: int, bits: int = 16) -> bytes:
    """PCM of 8/16/24/32 bits with Python's wave module."""
    if bits == 8:
        raw = np.clip(np.round(signal * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    elif bits == 24:
        values = np.clip(np.round(signal * (1 << 23)), -(1 << 23), (1 << 23) - 1).astype(np.int32)
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in values.reshape(-1))
    else:
        dtype, scale = {16: ("<i2", 32767), 32: ("<i4", 2**31 - 1)}[bits]
        raw = np.round(signal * scale).astype(dtype).tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(signal.shape[1])
        out.setsampwidth(bits // 8)
        out.setframerate(rate)
        out.writeframes(raw)
    return buffer.getvalue()


def float_wav(signal: np.ndarray, rate: int, dtype: str = "<f4", extensible: bool = False) -> bytes:
    """IEEE float WAV (format 3, or WAVE_FORMAT_EXTENSIBLE naming it), written by hand: the wave module writes PCM only."""
    data = signal.astype(dtype).tobytes()
    channels, width = signal.shape[1], np.dtype(dtype).itemsize
    if extensible:
        guid = struct.pack("<H", 3) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * channels * width, channels * width, width * 8, 22, width * 8, 0) + guid
    else:
        fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * channels * width, channels * width, width * 8)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def numpy_log_mel(x: np.ndarray, rate: int, n_fft: int, hop_length: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """torchaudio's MelSpectrogram(power=2) in NumPy: reflect-padded centred frames, periodic Hann, HTK mel, log(+1e-6)."""
    padded = np.pad(x, n_fft // 2, mode="reflect")
    frames = 1 + (len(padded) - n_fft) // hop_length
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    spectrum = np.abs(np.fft.rfft(np.stack([padded[i * hop_length:i * hop_length + n_fft] * window for i in range(frames)]), axis=1)) ** 2
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    points = 700 * (10 ** (np.linspace(mel(f_min), mel(f_max), n_mels + 2) / 2595) - 1)
    freqs = np.linspace(0, rate // 2, n_fft // 2 + 1)
    bank = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        left, centre, right = points[m:m + 3]
        bank[:, m] = np.maximum(0, np.minimum((freqs - left) / (centre - left), (right - freqs) / (right - centre)))
    return np.log(spectrum @ bank + 1e-6).T


def expected(project: AudioProject, signal: np.ndarray, rate: int) -> torch.Tensor:
    """Probabilities computed here: mono by averaging, scipy's resample_poly, padded/trimmed, NumPy log-mel, the model."""
    mono = signal.mean(axis=1)
    g = np.gcd(rate, RATE)
    resampled = resample_poly(mono, RATE // g, rate // g) if rate != RATE else mono
    clip = np.zeros(SAMPLES)
    clip[: min(SAMPLES, len(resampled))] = resampled[:SAMPLES]
    if project.features == "log_mel":
        inputs = torch.tensor(numpy_log_mel(clip, RATE, **MEL), dtype=torch.float32)[None]
    else:
        inputs = torch.tensor(clip, dtype=torch.float32)[None]
    with torch.inference_mode():
        return torch.softmax(project.model(inputs), dim=1)[0]


@pytest.fixture(scope="module")
def waveform_project(tmp_path_factory: pytest.TempPathFactory) -> AudioProject:
    return audio_project(tmp_path_factory.mktemp("audio"), "waveform")


@pytest.fixture(scope="module")
def mel_project(tmp_path_factory: pytest.TempPathFactory) -> AudioProject:
    return audio_project(tmp_path_factory.mktemp("audio"), "log_mel")


@pytest.fixture(scope="module", params=["waveform", "log_mel"])
def project(request: pytest.FixtureRequest) -> AudioProject:
    return request.getfixturevalue("waveform_project" if request.param == "waveform" else "mel_project")


@pytest.fixture(scope="module")
def served(project: AudioProject, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with serveready.load(project.archive, into=tmp_path_factory.mktemp("unpacked")) as model:
        yield model


def _probabilities(answer: serveready.Answer) -> torch.Tensor:
    assert answer.status == 200, answer.body
    document = json.loads(answer.body)
    predictions = document["predictions"] if "predictions" in document else None
    if predictions is None:
        [output] = document["outputs"]
        return torch.tensor(output["data"]).reshape(output["shape"])[0]
    row = predictions[0] if isinstance(predictions[0], list) else predictions
    assert [p["class"] for p in row] == [CLASSES[p["index"]] for p in row]
    return torch.tensor([{p["index"]: p["probability"] for p in row}[i] for i in range(3)])


def test_the_resampler_is_scipys_resample_poly() -> None:
    """Both paths (one matrix product per block of outputs, and windows gathered when the block is too big)."""
    rng = np.random.default_rng(0)
    for rate_in, rate_out, n in [(22050, 8000, 9001), (44100, 16000, 4410), (8000, 16000, 3000), (48000, 16000, 4800), (11025, 8000, 777), (8000, 44100, 500),
                              (22050, 8000, 1), (8000, 48000, 5), (8001, 8000, 3000)]:  # 8001/8000: too big a block, gathered
        x = rng.normal(size=n)
        g = np.gcd(rate_in, rate_out)
        want = resample_poly(x, rate_out // g, rate_in // g)
        got = resample(torch.tensor(x, dtype=torch.float32), rate_in, rate_out).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_log_mel_is_torchaudios_melspectrogram_in_numpy() -> None:
    x = tone(0.5, RATE)[:, 0]
    got = log_mel(torch.tensor(x, dtype=torch.float32)[None], RATE, **MEL)[0].numpy()
    want = numpy_log_mel(x, RATE, **MEL)
    assert got.shape == want.shape == (MEL["n_mels"], FRAMES)
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize(
    ("make", "tolerance"),
    [
        (lambda s: wav_file(s, 8000, 8), 2 / 128), (lambda s: wav_file(s, 8000, 16), 2 / 32768), (lambda s: wav_file(s, 8000, 24), 1e-6),
        (lambda s: wav_file(s, 8000, 32), 1e-7), (lambda s: float_wav(s, 8000), 1e-7), (lambda s: float_wav(s, 8000, "<f8"), 1e-7),
        (lambda s: float_wav(s, 8000, extensible=True), 1e-7),
    ],
    ids=["pcm8", "pcm16", "pcm24", "pcm32", "float32", "float64", "extensible-float32"],
)
def test_every_wav_sample_format_reads_as_its_samples(make, tolerance: float) -> None:  # noqa: ANN001
    signal = tone(0.25, 8000, channels=2)
    audio = read_audio(make(signal), Limits(5.0, 2))
    assert audio.rate == 8000 and audio.samples.shape == (2, len(signal))
    np.testing.assert_allclose(audio.samples.numpy().T, signal, atol=tolerance * 1.01 + 1e-7)


@pytest.mark.parametrize(("rate", "channels", "seconds"), [(8000, 1, 0.5), (22050, 2, 0.3), (44100, 1, 0.8), (16000, 2, 1.2), (11025, 1, 0.1)])
def test_any_rate_and_channels_give_the_models_own_answer(project: AudioProject, served, rate: int, channels: int, seconds: float) -> None:  # noqa: ANN001
    signal = tone(seconds, rate, channels, seed=1)
    want = expected(project, signal, rate)
    data = wav_file(signal, rate, 16)
    got = _probabilities(served.predict(data, "audio/wav"))
    signal16 = np.frombuffer(wave.open(io.BytesIO(data)).readframes(10**7), "<i2").reshape(-1, channels) / 32768.0
    torch.testing.assert_close(got, expected(project, signal16, rate), rtol=1e-4, atol=1e-5)
    assert (got - want).abs().max() < 0.05  # 16-bit rounding of the file only


def test_every_request_form_gets_the_same_answer(project: AudioProject, served) -> None:  # noqa: ANN001
    data = wav_file(tone(0.4, 22050, 1, seed=2), 22050)
    b64 = base64.b64encode(data).decode()
    header = json.dumps({"inputs": [{"name": "audio", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + len(data)}}]}).encode()
    answers = {
        "raw": served.predict(data, "audio/wav"),
        "json": served.predict(json.dumps({"audio": b64}).encode(), "application/json"),
        "v1": served.predict(json.dumps({"instances": [{"b64": b64}]}).encode(), "application/json"),
        "v2 json": served.predict(json.dumps({"inputs": [{"name": "audio", "shape": [1], "datatype": "BYTES", "data": [b64]}]}).encode(), "application/json"),
        "v2 binary": served.predict(header + struct.pack("<I", len(data)) + data, "application/octet-stream", {"Inference-Header-Content-Length": str(len(header))}),
    }
    first = _probabilities(answers["raw"])
    for form, answer in answers.items():
        torch.testing.assert_close(_probabilities(answer), first, rtol=1e-5, atol=1e-6, msg=form)
    assert len(json.loads(served.predict(data, "audio/wav", {"X-Top-K": "1"}).body)["predictions"]) == 1


def _lying(data: bytes) -> bytes:
    """The same WAV with a data chunk size larger than the body."""
    at = data.index(b"data") + 4
    return data[:at] + struct.pack("<I", struct.unpack_from("<I", data, at)[0] * 4) + data[at + 4:]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"\x00\x01 not audio at all", 400, "the body is not audio: send a WAV file"),
        (wav_file(tone(0.2, 8000), 8000)[:30], 400, "WAV: the fmt chunk is cut short"),
        (wav_file(tone(0.2, 8000), 8000)[:44] + b"\x00\x01", 400, "WAV: the header says 1600 frames, the body holds 1"),
        (_lying(wav_file(tone(0.2, 8000), 8000)), 400, "the file is cut short or its header lies"),
        (wav_file(np.zeros((0, 1)), 8000), 400, "WAV: the file holds no audio frames"),
        (float_wav(np.array([[0.1], [np.nan], [0.2]]), 8000), 400, "WAV: the samples hold NaN or infinite values"),
        (float_wav(np.array([[0.1], [np.inf]]), 8000), 400, "NaN or infinite"),
        (wav_file(tone(6.0, 8000), 8000), 400, "audio: 6.00 s long, more than the limit of 5 s"),
        (wav_file(tone(0.1, 8000, channels=3), 8000), 400, "audio: 3 channels, more than the limit of 2"),
        (wav_file(tone(0.1, 500), 500), 400, "audio: a sample rate of 500 Hz"),
        (wav_file(tone(0.05, 100003), 100003), 400, "100003 Hz cannot be resampled to 8000 Hz here"),
        (b"fLaC\x00\x00\x00\x22" + bytes(40), 415, "FLAC audio needs soundfile on the serving host: pip install soundfile"),
        (b"ID3\x04" + bytes(40), 415, "MP3 audio needs soundfile"),
        (b'{"audio": "not base64!"}', 400, "'audio' is not valid base64"),
        (b'{"sound": "AAAA"}', 400, 'send an audio file as the body (Content-Type: audio/wav), or JSON {"audio": "<base64 file>"}'),
        (b'{"inputs": [{"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}', 400, "an audio model takes audio files"),
        (b'{"instances": [3]}', 400, 'an instance must be {"b64": "<base64 audio file>"}'),
    ],
)
def test_bad_audio_gets_its_status_naming_the_problem_and_only_that_request_fails(served, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
                                                                                   body: bytes, status: int, message: str) -> None:
    monkeypatch.setitem(sys.modules, "soundfile", None)  # this host has no soundfile: compressed formats get 415
    good = (wav_file(tone(0.3, 8000), 8000), "audio/wav", {})
    replies = served.predict_batch([good, (body, "audio/wav", {}), good])
    assert [r.status for r in replies] == [200, status, 200], replies[1].body
    document = json.loads(replies[1].body)
    assert message in document.get("message", document.get("error", "")), document


def test_a_wav_bomb_is_refused_from_its_header_before_anything_is_decoded(served) -> None:  # noqa: ANN001
    """A 44-byte header declaring a billion frames (and a streaming writer's placeholder size, judged by the body): 400, nothing allocated."""
    fmt = struct.pack("<HHIIHH", 1, 2, 8000, 8000 * 4, 4, 16)
    bomb = b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", 0x7FFE0000) + bytes(64)
    answer = served.predict(bomb, "audio/wav")
    assert answer.status == 400 and "the file is cut short or its header lies" in json.loads(answer.body)["message"]
    streaming = bomb[:40] + struct.pack("<I", 0xFFFFFFFF) + bytes(8000 * 4 * 6)  # 6 s of a stream with no size: judged by length
    answer = served.predict(streaming, "audio/wav")
    assert answer.status == 400 and "6.00 s long, more than the limit of 5 s" in json.loads(answer.body)["message"]


def test_explanations_give_attributions_over_time(project: AudioProject, served) -> None:  # noqa: ANN001
    answer = served.explain(wav_file(tone(0.4, 8000, seed=1), 8000), "audio/wav")
    assert answer.status == 200, answer.body
    document = json.loads(answer.body)
    attributions = np.array(document["attributions"])
    if project.features == "waveform":
        assert attributions.shape == (SAMPLES // 80,) and document["step_seconds"] == 0.01
    else:
        assert attributions.shape == (MEL["n_mels"], FRAMES) and np.array(document["input"]).shape == (MEL["n_mels"], FRAMES)
        assert document["step_seconds"] == MEL["hop_length"] / RATE
    # Completeness: the attributions add up to the predicted class's logit against the all-zero input.
    signal = tone(0.4, 8000, seed=1)
    clip = torch.zeros(SAMPLES)
    clip[: len(signal)] = torch.tensor(signal[:, 0], dtype=torch.float32)[:SAMPLES]
    clip = torch.round(clip * 32767) / 32768  # the 16-bit file
    inputs = clip[None] if project.features == "waveform" else log_mel(clip[None], RATE, **MEL)
    with torch.inference_mode():
        logits = project.model(inputs)[0]
        gap = float(logits.max() - project.model(torch.zeros_like(inputs))[0][logits.argmax()])
    assert abs(attributions.sum() - gap) < 0.05 * max(1.0, abs(gap))


@pytest.mark.parametrize(
    ("features", "handler", "shape", "message"),
    [
        ("waveform", {}, [2, 20, 51], "model.sample_shape must be [batch, samples] for a waveform audio classifier"),
        ("log_mel", {}, [2, 4000], "model.sample_shape must be [batch, n_mels (20), frames] for log_mel features"),
        ("log_mel", {"f_max": 5000.0}, None, "handler.f_min 20 and f_max 5000 must satisfy 0 <= f_min < f_max <= sample_rate / 2 (4000)"),
        ("log_mel", {"hop_length": 300}, None, "handler.hop_length 300 exceeds n_fft 256"),
        ("waveform", {"max_seconds": 0.25}, None, "the model takes 0.5 s clips, more than handler.max_seconds 0.25"),
        ("waveform", {"features": "mfcc"}, None, "handler.features must be one of 'waveform', 'log_mel', got 'mfcc'"),
    ],
)
def test_bad_audio_configs_fail_the_build_naming_the_key(waveform_project: AudioProject, mel_project: AudioProject, features: str, handler: dict,
                                                         shape: list | None, message: str) -> None:
    project = waveform_project if features == "waveform" else mel_project
    path = next((project.folder / "model_configs").glob("clip_*.yaml"))
    config = yaml.safe_load(path.read_text())
    config["handler"].update(handler)
    if shape is not None:
        config["model"]["sample_shape"] = shape
    broken = path.with_name("broken.yaml")
    broken.write_text(yaml.safe_dump({**config, "name": "broken"}))
    try:
        with pytest.raises(ArchiverError) as err:
            load_spec(broken)
        assert message in err.value.message
    finally:
        broken.unlink()


def test_init_writes_an_audio_config_that_builds(waveform_project: AudioProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serveready.scripts.archive import main as ts_archive

    folder = tmp_path / "mine"
    (folder / "models").mkdir(parents=True)
    for name in ("models/audio_models.py", "labels.txt", "audio.pt"):
        (folder / name).write_bytes((waveform_project.folder / name).read_bytes())
    monkeypatch.chdir(folder)
    args = ["init", "clip", "--model-file", "models/audio_models.py", "--class", "WaveNet", "--input", "audio", "--sample-shape", "2", str(SAMPLES),
            "--weights", "audio.pt", "--classes-file", "labels.txt"]
    assert ts_archive(args) == 0
    text = (folder / "model_configs" / "clip.yaml").read_text()
    for line in ("entry: audio_classifier", "classes_file: labels.txt", "# sample_rate: 16000", "# features: waveform", "# max_seconds: 30.0"):
        assert line in text, line
    config = yaml.safe_load(text)
    config["handler"]["sample_rate"] = RATE
    (folder / "model_configs" / "clip.yaml").write_text(yaml.safe_dump(config))
    assert ts_archive(["build"]) == 0
    with serveready.load(folder / "model_store" / "clip.mar", into=tmp_path / "unpacked") as model:
        got = _probabilities(model.predict(wav_file(tone(0.5, 16000, seed=1), 16000), "audio/wav"))
    signal16 = np.round(tone(0.5, 16000, seed=1) * 32767) / 32768
    torch.testing.assert_close(got, expected(waveform_project, signal16, 16000), rtol=1e-4, atol=1e-5)
