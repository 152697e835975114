"""Train SpokenDigitNet on synthetic speech, and hold it to real recordings.

The task: which digit, 0 to 9, a clip says, in English, Spanish, French, Italian or Russian.
Training clips are synthesized by Debian's ``espeak-ng`` (deterministic; many voices, accents,
speeds and pitches), then made less clean: speed changes, a room (an exponentially decaying
impulse response), a random band (a microphone or a telephone line), spectral tilt, noise, any
loudness, any position in the clip. The held-out clips are every real digit recording of
Debian's ``asterisk-core-sounds-{en,es,fr,it,ru}-wav`` (professional voice prompts, 8 kHz 16-bit
mono, CC-BY-SA-3.0): no real speaker is ever heard in training. Install both with
``apt-get install espeak-ng asterisk-core-sounds-{en,es,fr,it,ru}-wav``.

Every clip goes through the library's own audio path (``serveready.handlers.audio``: its WAV
reader, resampler and log-mel front end), so training sees exactly what a served request becomes.
``ts-archive train spoken_digits`` calls :func:`fit`; it writes ``artifacts/spoken_digits.pt``,
its metrics (accuracy on the real recordings, with their count) and ``data/spoken_digits.pt``
(the real recordings as model inputs, for the report and the variants' fidelity bounds).
"""

from __future__ import annotations

import math
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from serveready.archiver import TrainingJob
from serveready.handlers import option
from serveready.handlers.audio import Limits, fit_length, log_mel, read_audio, resample, to_mono

SOUNDS = Path("/usr/share/asterisk/sounds")
LANGUAGES = ("en", "es", "fr", "it", "ru")
#: espeak-ng voices per language (accents), and the voice variants put on them
DIALECTS = {"en": ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc"], "es": ["es", "es-419"],
            "fr": ["fr-fr", "fr-be", "fr-ch"], "it": ["it"], "ru": ["ru", "ru-lv"]}
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3", "croak", "adam", "anika",
            "belinda", "boris", "david", "edward", "iven", "john", "linda", "max", "paul", "robert", "steph", "travis", "victor", "grandma",
            "grandpa", "Andy", "Annie", "Denis", "Lee", "Mario", "Michael", "Storm", "aunty", "benjamin", "caleb", "ed", "gustave", "michel",
            "norbert", "pablo", "pedro", "quincy", "rob", "sandro", "shelby", "zac"]
LIMITS = Limits(max_seconds=30.0, max_channels=2)


@dataclass(frozen=True, kw_only=True)
class Options:
    """``training:`` of spoken_digits.yaml; the front end's numbers are the handler's (the config's ``handler:``)."""

    seed: int = option(0, minimum=0, doc="seeds the voices, the augmentation, the mini-batches and the weights")
    voices_per_language: int = option(60, minimum=1, doc="espeak-ng voices (accent, variant, speed, pitch) per language, each saying 0-9")
    epochs: int = option(8, minimum=1, doc="each epoch sees every synthetic clip afresh augmented")
    batch_size: int = option(64, minimum=1)
    lr: float = option(0.002, minimum=0)
    sample_rate: int = option(8000, minimum=1000)
    seconds: float = option(1.0, minimum=0.1, doc="clip length the model takes (the handler's (frames - 1) * hop_length)")
    n_fft: int = option(256, minimum=16)
    hop_length: int = option(80, minimum=1)
    n_mels: int = option(40, minimum=1)
    f_min: float = option(20.0, minimum=0)
    f_max: float = option(4000.0, minimum=1)


def need_tools() -> None:
    missing = [what for what, ok in (("espeak-ng", shutil.which("espeak-ng")), ("asterisk-core-sounds-*-wav", (SOUNDS / "en" / "digits").is_dir())) if not ok]
    if missing:
        raise SystemExit(f"spoken_digits trains on {' and '.join(missing)}: apt-get install espeak-ng asterisk-core-sounds-{{en,es,fr,it,ru}}-wav")


def speak(voice: str, digit: int, speed: int, pitch: int, rate: int) -> torch.Tensor:
    """One synthetic clip of ``digit`` at ``rate`` Hz, trimmed to where it speaks."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", str(digit)], capture_output=True, check=True).stdout
    audio = read_audio(wav, LIMITS)
    return trim(resample(to_mono(audio.samples), audio.rate, rate))


def trim(clip: torch.Tensor, threshold: float = 0.02) -> torch.Tensor:
    loud = (clip.abs() > threshold * clip.abs().max()).nonzero()
    return clip[int(loud[0]):int(loud[-1]) + 1] if len(loud) else clip


def synthetic(options: Options) -> tuple[list[torch.Tensor], list[int]]:
    """``voices_per_language`` random espeak-ng voices per language, each saying 0 to 9 (seeded)."""
    pick = random.Random(options.seed)
    jobs = []
    for language in LANGUAGES:
        for _ in range(options.voices_per_language):
            voice = f"{pick.choice(DIALECTS[language])}+{pick.choice(VARIANTS)}"
            speed, pitch = pick.randint(100, 220), pick.randint(10, 90)
            jobs += [(voice, digit, speed, pitch) for digit in range(10)]
    with ThreadPoolExecutor(4) as pool:  # espeak-ng runs as a process: four at a time
        clips = list(pool.map(lambda j: speak(*j, options.sample_rate), jobs))
    return clips, [digit for _, digit, _, _ in jobs]


def real_recordings(rate: int) -> tuple[list[torch.Tensor], list[int], list[str]]:
    """Every real digit recording of the five voices: ``<lang>/digits/<d>.wav`` (and Russian's ``1n``, ``2n``), as a
    served request becomes it (mono, resampled, not trimmed: the accuracy is what the archive answers)."""
    clips, labels, names = [], [], []
    for language in LANGUAGES:
        for path in sorted((SOUNDS / language / "digits").glob("*.wav")):
            stem = path.stem.removesuffix("n")
            if len(stem) == 1 and stem.isdigit():
                audio = read_audio(path.read_bytes(), LIMITS)
                clips.append(resample(to_mono(audio.samples), audio.rate, rate))
                labels.append(int(stem))
                names.append(f"{language}/{path.stem}")
    return clips, labels, names


def augmented(clip: torch.Tensor, length: int, rate: int, pick: random.Random) -> torch.Tensor:
    """A speed change, a room, a band, a tilt, any loudness, noise, anywhere in the clip."""
    speed = pick.uniform(0.85, 1.15)
    clip = resample(clip, rate, int(round(rate / speed / 100)) * 100)
    if pick.random() < 0.7:  # a room: exponentially decaying noise after the direct sound
        taps = int(pick.uniform(0.05, 0.4) * rate)
        generator = torch.Generator().manual_seed(pick.randrange(1 << 30))
        response = torch.randn(taps, generator=generator) * torch.exp(-6.9 * torch.arange(taps) / taps)
        response[0] = 1.0 / pick.uniform(0.05, 0.5)
        clip = _convolve(clip, response)[: len(clip) + taps // 4]
    if pick.random() < 0.7:  # a microphone or a line: a random band
        clip = _convolve(clip, _band(pick.uniform(50, 400), pick.uniform(2500, rate / 2 - 50), rate))[15:15 + len(clip)]
    if pick.random() < 0.5:  # spectral tilt
        tilt = pick.uniform(-0.95, 0.95)
        clip = torch.cat([clip[:1], clip[1:] - tilt * clip[:-1]])
    clip = clip[:length] * (pick.uniform(0.05, 1.0) / (float(clip.abs().max()) + 1e-9))
    out = torch.zeros(length)
    start = pick.randint(0, length - len(clip))
    out[start:start + len(clip)] = clip
    generator = torch.Generator().manual_seed(pick.randrange(1 << 30))
    return out + torch.randn(length, generator=generator) * 10 ** -pick.uniform(1.0, 3.0) * float(out.abs().max())


def _convolve(signal: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    size = len(signal) + len(response) - 1
    return torch.fft.irfft(torch.fft.rfft(signal, size) * torch.fft.rfft(response, size), size)


def _band(low: float, high: float, rate: int, taps: int = 31) -> torch.Tensor:
    """A windowed-sinc band-pass filter (scipy's firwin(taps, [low, high], pass_zero=False) without scipy)."""
    n = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    window = torch.hamming_window(taps, periodic=False, dtype=torch.float64)

    def lowpass(cutoff: float) -> torch.Tensor:
        return 2 * cutoff / rate * torch.sinc(2 * cutoff / rate * n)

    band = (lowpass(high) - lowpass(low)) * window
    centre = (low + high) / 2
    gain = float((band * torch.cos(2 * math.pi * centre / rate * n)).sum())
    return (band / gain).to(torch.float32)


def features(clips: torch.Tensor, options: Options) -> torch.Tensor:
    return log_mel(clips, options.sample_rate, options.n_fft, options.hop_length, options.n_mels, options.f_min, options.f_max)


def fit(job: TrainingJob, options: Options) -> dict[str, float]:
    """Cross-entropy with Adam on afresh-augmented synthetic clips, seeded, one thread; accuracy on the real recordings."""
    need_tools()
    length = int(options.seconds * options.sample_rate)
    sys.stderr.write(f"  {job.name}: synthesizing {len(LANGUAGES) * options.voices_per_language * 10} clips with espeak-ng ...")
    clips, labels = synthetic(options)
    real, real_labels, _ = real_recordings(options.sample_rate)
    sys.stderr.write(f" {len(clips)} synthetic, {len(real)} real\n")
    x_test = features(torch.stack([fit_length(c, length) for c in real]), options)
    y_test, y_train = torch.tensor(real_labels), torch.tensor(labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order: one seed, one weights file
    torch.manual_seed(options.seed)
    pick = random.Random(options.seed + 1)
    try:
        model = job.build_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
        order = torch.Generator().manual_seed(options.seed)
        for epoch in range(1, options.epochs + 1):
            x_train = features(torch.stack([augmented(c, length, options.sample_rate, pick) for c in clips]), options)
            model.train()
            for idx in torch.randperm(len(y_train), generator=order).split(options.batch_size):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()
                optimizer.step()
            sys.stderr.write(f"\r  {job.name}: epoch {epoch}/{options.epochs} train loss {loss.item():.4f}" + ("\n" if epoch == options.epochs else ""))
        model.eval()
        with torch.inference_mode():
            right = int((model(x_test).argmax(dim=1) == y_test).sum())
    finally:
        torch.set_num_threads(threads)
    # The count, and the accuracy as a Python division of it (a float32 mean differs in the 8th digit).
    metrics = {"real_accuracy": right / len(real), "real_right": right, "real_clips": len(real), "synthetic_clips": len(clips)}
    job.save(model, metrics)
    job.save_data(x_test, y_test)
    return metrics
