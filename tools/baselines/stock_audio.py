"""A stock-style TorchServe handler for ``spoken_digits``: a 16-bit PCM WAV in, top-3 digits out.

What a TorchServe user writes now that torchaudio no longer tracks torch: Python's ``wave``, a
linear-interpolation resampler to 8 kHz, torch's ``stft`` and an HTK mel bank (torchaudio's
``MelSpectrogram`` defaults), one second per clip. Used by ``ts-bench`` as a baseline.
"""

import io
import math
import wave

import torch
from ts.torch_handler.base_handler import BaseHandler

RATE, SAMPLES, N_FFT, HOP, N_MELS, F_MIN, F_MAX = 8000, 8000, 256, 80, 40, 20.0, 4000.0


def read_clip(data):
    """A WAV's samples, mono, at RATE, padded or cut to SAMPLES."""
    with wave.open(io.BytesIO(data)) as clip:
        rate, channels, raw = clip.getframerate(), clip.getnchannels(), clip.readframes(clip.getnframes())
    samples = torch.frombuffer(bytearray(raw), dtype=torch.int16).to(torch.float32).div(32768.0).reshape(-1, channels).mean(dim=1)
    if rate != RATE:
        samples = torch.nn.functional.interpolate(samples[None, None], size=max(1, round(len(samples) * RATE / rate)), mode="linear")[0, 0]
    return torch.nn.functional.pad(samples[:SAMPLES], (0, max(0, SAMPLES - len(samples))))


def mel_bank():
    mel = lambda hz: 2595.0 * math.log10(1.0 + hz / 700.0)  # noqa: E731
    points = 700.0 * (10 ** (torch.linspace(mel(F_MIN), mel(F_MAX), N_MELS + 2) / 2595.0) - 1.0)
    freqs = torch.linspace(0, RATE // 2, N_FFT // 2 + 1)[:, None]
    left, centre, right = points[:-2], points[1:-1], points[2:]
    return torch.clamp(torch.minimum((freqs - left) / (centre - left), (right - freqs) / (right - centre)), min=0.0)


def features(clips, bank):
    """``[batch, N_MELS, frames]`` log-mel power, as the model was trained on."""
    spectrum = torch.stft(clips, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, pad_mode="reflect", return_complex=True)
    return torch.log(torch.matmul(spectrum.abs().pow(2).transpose(1, 2), bank).transpose(1, 2) + 1e-6)


def top_digits(logits, k=3):
    top = torch.softmax(logits, dim=1).topk(k, dim=1)
    return [[{"class": str(i), "index": i, "probability": p} for i, p in zip(idx, prob, strict=True)]
            for idx, prob in zip(top.indices.tolist(), top.values.tolist(), strict=True)]


class StockAudioHandler(BaseHandler):
    def initialize(self, context):
        threads = ((context.model_yaml_config or {}).get("handler") or {}).get("torch_threads")
        if threads:
            torch.set_num_threads(int(threads))
        super().initialize(context)
        self.bank = mel_bank()

    def preprocess(self, data):
        return features(torch.stack([read_clip(row.get("data") or row.get("body")) for row in data]), self.bank)

    def postprocess(self, data):
        return [{"predictions": row} for row in top_digits(data)]
