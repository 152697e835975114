"""Audio files to model input, in torch alone: a WAV reader, mono mixing, a band-limited resampler, log-mel.

No torchaudio (it no longer tracks torch's releases): the resampler is scipy's
``resample_poly`` (a Kaiser-windowed sinc FIR, polyphase) written in torch and tested against
it, the log-mel front end torchaudio's ``MelSpectrogram`` (HTK mel scale, no filter
normalisation) tested against a NumPy transcription. FLAC, OGG and MP3 are read with
``soundfile`` (libsndfile) when the host has it. Every check that bounds memory happens on the
header, before a sample is decoded.

Only torch and the standard library (soundfile optional): this module travels inside every archive.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import InvalidInput, UnsupportedMediaType

#: WAVE format tags: integer PCM, IEEE float, and the extensible header that names one of them
PCM, FLOAT, EXTENSIBLE = 1, 3, 0xFFFE
#: the sample rates a request may have (a header of 4 billion Hz must not size the resampler's filter)
MIN_RATE, MAX_RATE = 1_000, 384_000
#: data chunk sizes from here up are a streaming writer's placeholder (0x7FFFF000, 0xFFFFFFFF), not a length:
#: the body's length decides (and is judged against max_seconds like any other)
STREAMING_SIZE = 0x7FFF0000
#: the resampler's polyphase filter grows with the larger of the reduced rate ratio's terms
MAX_RATIO_TERM = 1 << 16
SOUNDFILE_HINT = "pip install soundfile (libsndfile reads FLAC, OGG and MP3)"


@dataclass(frozen=True)
class Audio:
    """Decoded audio: float32 samples in [-1, 1], ``[channels, frames]``, and their rate."""

    samples: torch.Tensor
    rate: int

    @property
    def seconds(self) -> float:
        return self.samples.shape[1] / self.rate


@dataclass(frozen=True)
class Limits:
    """What one clip may be, checked on its header before it is decoded."""

    max_seconds: float
    max_channels: int


def read_audio(data: bytes, limits: Limits) -> Audio:
    """A WAV (PCM 8/16/24/32-bit, float 32/64-bit) or, with soundfile, FLAC/OGG/MP3 file's samples.

    Raises:
        InvalidInput: not audio, truncated, a header that lies, zero frames, too long, too many
            channels, or samples that are not finite numbers.
        UnsupportedMediaType: a format this host cannot read (415, saying what to install).
    """
    if len(data) >= 12 and data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return _read_wav(data, limits)
    kind = _other_format(data)
    if kind is None:
        raise InvalidInput("the body is not audio: send a WAV file (RIFF/WAVE; FLAC, OGG or MP3 where the host has soundfile)")
    return _read_soundfile(data, kind, limits)


def _other_format(data: bytes) -> str | None:
    if data[:4] == b"fLaC":
        return "FLAC"
    if data[:4] == b"OggS":
        return "OGG"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "MP3"
    return None


def _read_wav(data: bytes, limits: Limits) -> Audio:
    fmt: tuple[int, int, int, int, int] | None = None
    offset = 12
    while offset + 8 <= len(data):
        chunk, size = data[offset:offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        body = offset + 8
        if chunk == b"fmt ":
            if size < 16 or body + 16 > len(data):
                raise InvalidInput("WAV: the fmt chunk is cut short")
            tag, channels, rate, _, block, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag == EXTENSIBLE and size >= 40 and body + 40 <= len(data):
                tag = struct.unpack_from("<H", data, body + 24)[0]  # the sub-format GUID starts with the tag
            fmt = (tag, channels, rate, block, bits)
        elif chunk == b"data":
            if fmt is None:
                raise InvalidInput("WAV: the data chunk comes before any fmt chunk")
            return _wav_samples(data, body, size, fmt, limits)
        offset = body + size + (size & 1)  # chunks are padded to an even size
    raise InvalidInput("WAV: no data chunk (the file is cut short or not a WAV file)")


def _wav_samples(data: bytes, start: int, size: int, fmt: tuple[int, int, int, int, int], limits: Limits) -> Audio:
    tag, channels, rate, block, bits = fmt
    kinds = {(PCM, 8): "uint8", (PCM, 16): "int16", (PCM, 24): "int24", (PCM, 32): "int32", (FLOAT, 32): "float32", (FLOAT, 64): "float64"}
    kind = kinds.get((tag, bits))
    if kind is None:
        raise UnsupportedMediaType(f"WAV: format {tag} with {bits}-bit samples is not read here: send PCM 8/16/24/32-bit or float 32/64-bit")
    _check_header(channels, rate, limits)
    if block != channels * bits // 8:
        raise InvalidInput(f"WAV: block align {block} does not fit {channels} channel(s) of {bits}-bit samples")
    available = len(data) - start
    if size >= STREAMING_SIZE:  # a writer to a pipe (espeak-ng --stdout, sox, ffmpeg) that could not fill in the size
        size = available - available % block
    frames = size // block
    if frames == 0:
        raise InvalidInput("WAV: the file holds no audio frames")
    if size > available:
        raise InvalidInput(f"WAV: the header says {frames} frames, the body holds {available // block}: the file is cut short or its header lies")
    _check_length(frames, rate, limits)
    raw = data[start:start + frames * block]
    samples = _decode_pcm(raw, kind).reshape(frames, channels).T
    if kind.startswith("float") and not bool(samples.isfinite().all()):
        raise InvalidInput("WAV: the samples hold NaN or infinite values")
    return Audio(samples.contiguous(), rate)


def _decode_pcm(raw: bytes, kind: str) -> torch.Tensor:
    if kind == "uint8":
        return (torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.float32) - 128.0) / 128.0
    if kind == "int16":
        return torch.frombuffer(bytearray(raw), dtype=torch.int16).to(torch.float32) / 32768.0
    if kind == "int24":
        three = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, 3).to(torch.int32)
        values = three[:, 0] | (three[:, 1] << 8) | (three[:, 2] << 16)
        values = torch.where(values >= 1 << 23, values - (1 << 24), values)
        return values.to(torch.float32) / float(1 << 23)
    if kind == "int32":
        return (torch.frombuffer(bytearray(raw), dtype=torch.int32).to(torch.float64) / float(1 << 31)).to(torch.float32)
    dtype = torch.float32 if kind == "float32" else torch.float64
    return torch.frombuffer(bytearray(raw), dtype=dtype).to(torch.float32)


def _check_header(channels: int, rate: int, limits: Limits) -> None:
    if channels == 0:
        raise InvalidInput("audio: the header says 0 channels")
    if channels > limits.max_channels:
        raise InvalidInput(f"audio: {channels} channels, more than the limit of {limits.max_channels}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidInput(f"audio: a sample rate of {rate} Hz; send {MIN_RATE} to {MAX_RATE} Hz")


def _check_length(frames: int, rate: int, limits: Limits) -> None:
    seconds = frames / rate
    if seconds > limits.max_seconds:
        raise InvalidInput(f"audio: {seconds:.2f} s long, more than the limit of {limits.max_seconds:g} s")


def _read_soundfile(data: bytes, kind: str, limits: Limits) -> Audio:
    try:
        import io

        import soundfile
    except (ImportError, OSError):  # OSError: the Python package without its libsndfile
        raise UnsupportedMediaType(f"{kind} audio needs soundfile on the serving host: {SOUNDFILE_HINT}; or send WAV") from None
    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception as err:  # soundfile raises its own LibsndfileError
        raise InvalidInput(f"{kind}: the file cannot be read: {err}") from None
    _check_header(int(info.channels), int(info.samplerate), limits)
    if info.frames <= 0:
        raise InvalidInput(f"{kind}: the file holds no audio frames")
    _check_length(int(info.frames), int(info.samplerate), limits)
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as err:
        raise InvalidInput(f"{kind}: the file cannot be decoded: {err}") from None
    tensor = torch.from_numpy(samples.T.copy())
    if tensor.shape[1] == 0:
        raise InvalidInput(f"{kind}: the file holds no audio frames")
    if not bool(tensor.isfinite().all()):
        raise InvalidInput(f"{kind}: the samples hold NaN or infinite values")
    return Audio(tensor, int(rate))


# -- to the model's rate and length ---------------------------------------------------


def to_mono(samples: torch.Tensor) -> torch.Tensor:
    """``[channels, frames]`` -> ``[frames]``, averaging the channels."""
    return samples.mean(dim=0) if samples.shape[0] > 1 else samples[0]


@lru_cache(maxsize=16)
def _polyphase(up: int, down: int) -> tuple[torch.Tensor, int]:
    """scipy's resample_poly filter: firwin(2 * 10 * max(up, down) + 1, 1 / max(up, down), ('kaiser', 5.0)) * up,
    as float64, and its half length."""
    rate = max(up, down)
    half = 10 * rate
    taps = 2 * half + 1
    position = torch.arange(taps, dtype=torch.float64) - half
    cutoff = 1.0 / rate
    h = cutoff * torch.sinc(cutoff * position) * torch.kaiser_window(taps, periodic=False, beta=5.0, dtype=torch.float64)
    return h / h.sum() * up, half


def resample(signal: torch.Tensor, rate_in: int, rate_out: int) -> torch.Tensor:
    """``signal`` (1-D) from ``rate_in`` to ``rate_out`` Hz, as ``scipy.signal.resample_poly`` does: zero-stuff by
    ``up``, low-pass with a Kaiser-windowed sinc below the lower Nyquist frequency, keep every ``down``-th sample."""
    if rate_in == rate_out:
        return signal
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    if max(up, down) > MAX_RATIO_TERM:
        raise InvalidInput(f"audio: {rate_in} Hz cannot be resampled to {rate_out} Hz here (their ratio is {up}/{down}); "
                           "send a common rate (8000, 16000, 22050, 44100, 48000 Hz)")
    plan = _plan(up, down)
    n_out = -(-signal.shape[0] * up // down)
    padded = torch.cat([torch.zeros(plan.taps, dtype=torch.float64), signal.to(torch.float64),
                        torch.zeros(plan.taps, dtype=torch.float64)])
    out = _by_blocks(padded, plan, n_out) if plan.block is not None else _by_windows(padded, plan, n_out)
    return out.to(torch.float32)


@dataclass(frozen=True)
class _Plan:
    """What one ratio ``up/down`` needs, computed once: the filter as a bank of ``up`` phases, where output ``n``
    starts in the zero-stuffed signal, and (when small enough) the block matrix of :func:`_by_blocks`."""

    up: int
    down: int
    taps: int
    bank: torch.Tensor  # bank[p, j] = h[p + j * up]
    pre_pad: int
    pre_remove: int
    block: torch.Tensor | None  # [width, up]: output k * up + r = padded[k * down + lo : ... + width] @ block[:, r]
    lo: int


BLOCK_LIMIT = 1 << 20  # entries of the block matrix (8 MiB of float64); beyond it outputs are gathered in chunks


@lru_cache(maxsize=16)
def _plan(up: int, down: int) -> _Plan:
    h, half = _polyphase(up, down)
    taps = -(-h.shape[0] // up)
    flat = torch.cat([h, torch.zeros(taps * up - h.shape[0], dtype=torch.float64)])
    bank = flat.reshape(taps, up).T.contiguous()
    pre_pad = down - half % down
    pre_remove = (half + pre_pad) // down
    # Outputs n = k * up + r share the phase of r and start `down` inputs further on per k: one matrix product.
    t = (torch.arange(up) + pre_remove) * down - pre_pad
    base, phase = torch.div(t, up, rounding_mode="floor"), t % up
    lo = int(base.min()) + 1
    width = int(base.max()) + taps - lo + 1
    if width * up > BLOCK_LIMIT:
        return _Plan(up, down, taps, bank, pre_pad, pre_remove, None, 0)
    block = torch.zeros(width, up, dtype=torch.float64)
    j = torch.arange(taps)
    for r in range(up):
        block[int(base[r]) + taps - lo - j, r] = bank[int(phase[r]), j]
    return _Plan(up, down, taps, bank, pre_pad, pre_remove, block, lo)


def _by_blocks(padded: torch.Tensor, plan: _Plan, n_out: int) -> torch.Tensor:
    assert plan.block is not None
    blocks = -(-n_out // plan.up)
    width = plan.block.shape[0]
    need = plan.lo + (blocks - 1) * plan.down + width
    if padded.shape[0] < need:
        padded = torch.cat([padded, torch.zeros(need - padded.shape[0], dtype=torch.float64)])
    frames = padded[plan.lo:need].unfold(0, width, plan.down)
    return (frames @ plan.block).reshape(-1)[:n_out]


def _by_windows(padded: torch.Tensor, plan: _Plan, n_out: int) -> torch.Tensor:
    out = torch.empty(n_out, dtype=torch.float64)
    steps = torch.arange(plan.taps)
    for first in range(0, n_out, 1 << 15):  # in chunks: gather windows of `taps` inputs per output
        n = torch.arange(first, min(first + (1 << 15), n_out))
        t = (n + plan.pre_remove) * plan.down - plan.pre_pad  # position in the zero-stuffed signal, relative to h[0]
        base, phase = torch.div(t, plan.up, rounding_mode="floor"), t % plan.up
        windows = padded[(base + plan.taps).unsqueeze(1) - steps]
        out[first:first + len(n)] = (windows * plan.bank[phase]).sum(dim=1)
    return out


def fit_length(signal: torch.Tensor, samples: int) -> torch.Tensor:
    """Zero-padded or trimmed at its end to ``samples``."""
    if signal.shape[0] >= samples:
        return signal[:samples]
    return torch.cat([signal, torch.zeros(samples - signal.shape[0], dtype=signal.dtype)])


# -- features --------------------------------------------------------------------------


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def mel_filters(rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """``[n_fft // 2 + 1, n_mels]`` triangular filters on the HTK mel scale, unnormalised (torchaudio's
    ``melscale_fbanks`` defaults)."""
    freqs = torch.linspace(0, rate // 2, n_fft // 2 + 1, dtype=torch.float64)
    points = mel_to_hz(torch.linspace(float(hz_to_mel(torch.tensor(f_min))), float(hz_to_mel(torch.tensor(f_max))), n_mels + 2, dtype=torch.float64))
    slopes = points.unsqueeze(0) - freqs.unsqueeze(1)  # [freqs, n_mels + 2]
    gaps = points[1:] - points[:-1]
    down = -slopes[:, :-2] / gaps[:-1]
    up = slopes[:, 2:] / gaps[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0).to(torch.float32)


def log_mel(waveforms: torch.Tensor, rate: int, n_fft: int, hop_length: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """``[batch, samples]`` -> ``[batch, n_mels, 1 + samples // hop_length]``: the natural log of the mel power
    spectrogram plus 1e-6 (torchaudio's ``MelSpectrogram(power=2)``: centred frames, reflect padding,
    a periodic Hann window of ``n_fft``)."""
    window = torch.hann_window(n_fft, dtype=torch.float32)
    spectrum = torch.stft(waveforms, n_fft, hop_length, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = spectrum.abs() ** 2
    mel = torch.matmul(power.transpose(1, 2), mel_filters(rate, n_fft, n_mels, f_min, f_max)).transpose(1, 2)
    return torch.log(mel + 1e-6)
