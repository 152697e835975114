"""Audio classifiers (``handler: {entry: audio_classifier}``): one clip in, its top-k classes out.

Every clip goes the same way, whatever its format: decoded (WAV PCM 8/16/24/32-bit and float
32/64-bit here; FLAC, OGG, MP3 with the host's soundfile), its channels averaged to mono,
resampled to ``sample_rate`` (a band-limited polyphase resampler in torch, scipy's
``resample_poly``), then zero-padded or trimmed at its end to the model's input length. The
model takes, by ``features``:

    waveform   [batch, samples] floats in [-1, 1]           model.sample_shape [batch, samples]
    log_mel    [batch, n_mels, frames], log(mel power + 1e-6) (torchaudio's MelSpectrogram with
               n_fft, hop_length, n_mels, f_min, f_max)    model.sample_shape [batch, n_mels, frames]
               (the clip is (frames - 1) * hop_length samples)

Request:
    raw bytes of an audio file                           curl -H 'Content-Type: audio/wav' --data-binary @seven.wav
    {"audio": "<base64 file>", "k": 2}
    an ``X-Top-K: 2`` header also sets k
Response: {"predictions": [{"class": "7", "index": 7, "probability": 0.91}, ...]}  top k.
/explanations adds "attributions" over time (waveform: summed per 10 ms) or over mel band and
time (log_mel, with "input", the log-mel the model saw), and "step_seconds" between columns.

KServe v1: {"instances": [{"b64": "<base64 file>"}, ...]} -> {"predictions": [top k per clip]}.
Open Inference Protocol v2: one BYTES input of shape [n] (base64 strings in JSON, raw bytes with
the binary extension) -> output "probabilities", FP32 [n, classes].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .audio import Limits, fit_length, log_mel, read_audio, resample, to_mono
from .base import BatchHandler, Decoded
from .config import AudioOptions, ModelOptions
from .errors import ConfigError, InvalidInput
from .labels import class_names, requested_k, top_classes
from .payload import Request, decode_base64

#: Raw audio bodies carry k in this header (TorchServe 0.12 drops query strings of predictions).
TOP_K_HEADER = "x-top-k"
#: the time resolution of a waveform model's explanation
WAVEFORM_STEP_SECONDS = 0.01


def clip_samples(options: AudioOptions, model: ModelOptions) -> int:
    """The samples of one clip as the model takes it (log_mel: the samples its frames span)."""
    if options.features == "waveform":
        return int(model.sample_shape[1])
    return (int(model.sample_shape[2]) - 1) * options.hop_length


class AudioClassifierHandler(BatchHandler):
    """One audio clip per request (or per v1/v2 instance) in, its top-k classes with probabilities out."""

    options_type: Any = AudioOptions
    heavy_decode = True
    options: AudioOptions

    @classmethod
    def check(cls, options: AudioOptions, model: ModelOptions) -> None:
        shape = list(model.sample_shape)
        if options.features == "waveform" and len(shape) != 2:
            raise ConfigError(f"model.sample_shape must be [batch, samples] for a waveform audio classifier, got {shape}")
        if options.features == "log_mel":
            if len(shape) != 3 or shape[1] != options.n_mels:
                raise ConfigError(f"model.sample_shape must be [batch, n_mels ({options.n_mels}), frames] for log_mel features, got {shape}")
            if shape[2] < 2:
                raise ConfigError(f"model.sample_shape {shape} has fewer than 2 frames")
            if clip_samples(options, model) <= options.n_fft // 2:
                raise ConfigError(f"{shape[2]} frames of hop_length {options.hop_length} are shorter than half of n_fft {options.n_fft}")
        if clip_samples(options, model) / options.sample_rate > options.max_seconds:
            raise ConfigError(f"the model takes {clip_samples(options, model) / options.sample_rate:g} s clips, more than handler.max_seconds {options.max_seconds:g}")

    def setup(self, sample_outputs: torch.Tensor) -> None:
        self.classes = int(sample_outputs.shape[-1])
        self.names = class_names(self.options, self.model_dir, self.classes)
        self.samples = clip_samples(self.options, self.model_options)
        self.limits = Limits(self.options.max_seconds, self.options.max_channels)
        self.f_max = self.options.f_max if self.options.f_max is not None else self.options.sample_rate / 2

    # -- what a clip becomes ------------------------------------------------------------
    def waveform(self, data: bytes) -> torch.Tensor:
        """A file's bytes -> ``[samples]`` mono at ``sample_rate``, padded or trimmed to the model's length."""
        audio = read_audio(data, self.limits)
        mono = to_mono(audio.samples)
        return fit_length(resample(mono, audio.rate, self.options.sample_rate), self.samples)

    def features(self, waveforms: torch.Tensor) -> torch.Tensor:
        """``[batch, samples]`` -> what the model takes."""
        if self.options.features == "waveform":
            return waveforms
        o = self.options
        return log_mel(waveforms, o.sample_rate, o.n_fft, o.hop_length, o.n_mels, o.f_min, self.f_max)

    # -- requests ------------------------------------------------------------------
    def decode(self, request: Request) -> Decoded:
        body = request.body
        k = request.headers.get(TOP_K_HEADER)
        if isinstance(body, (bytes, bytearray)) and not bytes(body[:64]).lstrip().startswith(b"{"):
            clip = self.waveform(bytes(body))
        else:
            document = request.json()
            if not isinstance(document, dict) or "audio" not in document:
                raise InvalidInput('send an audio file as the body (Content-Type: audio/wav), or JSON {"audio": "<base64 file>"}')
            k = document.get("k", k)
            clip = self.waveform(decode_base64(document["audio"], "'audio'", "WAV (or FLAC, OGG, MP3)"))
        return Decoded(clip.unsqueeze(0), {"k": requested_k(k, self.options.top_k, self.classes)}, single=True)

    def decode_instances(self, values: Sequence[Any] | torch.Tensor, request: Request) -> Decoded:
        if isinstance(values, torch.Tensor):
            raise InvalidInput("an audio model takes audio files: send a BYTES tensor (base64 in JSON, raw bytes in binary), not numbers")
        clips = [self.decode_instance(v) for v in values]
        return Decoded(torch.stack(clips), {"k": requested_k(request.headers.get(TOP_K_HEADER), self.options.top_k, self.classes)})

    def decode_instance(self, value: Any) -> torch.Tensor:
        """{"b64": ...} or a base64 string (an audio file), or a file's bytes (v2 binary BYTES)."""
        if isinstance(value, (bytes, bytearray)):
            return self.waveform(bytes(value))
        if isinstance(value, dict) and "b64" in value:
            value = value["b64"]
        if not isinstance(value, str):
            raise InvalidInput('an instance must be {"b64": "<base64 audio file>"} or a base64 string')
        return self.waveform(decode_base64(value, "an instance", "WAV (or FLAC, OGG, MP3)"))

    def collate(self, items: Sequence[Decoded]) -> tuple[torch.Tensor, ...]:
        waveforms = torch.cat([item.rows for item in items]) if len(items) > 1 else items[0].rows
        return (self.features(waveforms),)

    def instance_of(self, inputs: torch.Tensor) -> Any:
        """A waveform row as a base64 WAV file (16-bit PCM at sample_rate); log_mel features cannot be inverted."""
        if self.options.features != "waveform":
            raise InvalidInput("a log_mel model's inputs cannot be turned back into audio: check it with audio files")
        import base64

        return base64.b64encode(wav_bytes(inputs, self.options.sample_rate)).decode()

    def sample_instance(self, seed: int) -> Any:
        """A base64 WAV of seeded noise under a rising tone, one clip long at ``sample_rate`` (ts-gpu-check sends these)."""
        import base64
        import math

        generator = torch.Generator().manual_seed(seed)
        t = torch.arange(self.samples, dtype=torch.float32) / self.options.sample_rate
        clip = 0.4 * torch.sin(2 * math.pi * (200 + 100 * seed % 7) * t * (1 + t)) + 0.05 * torch.randn(self.samples, generator=generator)
        return base64.b64encode(wav_bytes(clip, self.options.sample_rate)).decode()

    # -- answers ---------------------------------------------------------------------
    def encode_rows(self, outputs: torch.Tensor, item: Decoded) -> list[Any]:
        return top_classes(outputs, item.options["k"], self.names)

    def tensor_outputs(self, outputs: torch.Tensor, item: Decoded) -> dict[str, torch.Tensor]:
        return {"probabilities": torch.softmax(outputs, dim=1)}

    def explain_rows(self, item: Decoded, attributions: torch.Tensor) -> dict[str, list[Any]]:
        o = self.options
        if o.features == "waveform":
            step = max(1, round(o.sample_rate * WAVEFORM_STEP_SECONDS))
            usable = attributions.shape[1] - attributions.shape[1] % step
            per_step = attributions[:, :usable].reshape(attributions.shape[0], -1, step).sum(dim=2)
            return {"attributions": per_step.tolist(), "step_seconds": [step / o.sample_rate] * len(per_step)}
        features = self.features(item.rows)
        return {"input": features.tolist(), "attributions": attributions.tolist(), "step_seconds": [o.hop_length / o.sample_rate] * len(features)}


def wav_bytes(waveform: torch.Tensor, rate: int) -> bytes:
    """A mono 16-bit PCM WAV file of ``waveform`` (floats in [-1, 1])."""
    import io
    import struct
    import wave

    pcm = (waveform.clamp(-1, 1) * 32767).round().to(torch.int16).tolist()  # no numpy: a plain TorchServe host has none
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(struct.pack(f"<{len(pcm)}h", *pcm))
    return buffer.getvalue()
