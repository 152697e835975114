"""Ask TorchServe why a model chose a class, and save the answer as a picture.

    ts-explain image.png [more.png ...] [--model digits] [--run-dir run/default]
    ts-explain review.txt --model sentiment
    ts-explain seven.wav --model spoken_digits

Posts each file to ``/explanations/<model>`` (Integrated Gradients, computed by the
handler) and writes ``<file>.explanation.png`` next to it. An image gets the image, the
input the model saw, and the per-pixel attributions for the predicted class; a text
(``.txt``, sent as text/plain) gets its tokens, each shaded by its attribution; an audio file
(``.wav``, ``.flac``, ``.ogg``, ``.mp3``) its attributions over time (and mel band, with the
log-mel input the model saw).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from serveready.handlers.errors import ServereadyError

from .client import Inference
from .runinfo import RunDir, ScriptError

CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".txt": "text/plain; charset=utf-8",
                 ".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg"}
#: characters per line of a text explanation's picture
_LINE_CHARS = 60


def explain(run: RunDir, model: str, image: Path, timeout: float = 60.0) -> dict[str, Any]:
    """The handler's explanation for ``image``: predictions, the input the model saw, and attributions."""
    try:
        data = image.read_bytes()
    except OSError as err:
        raise ScriptError(f"cannot read {image}: {err.strerror or err}") from None
    content_type = CONTENT_TYPES.get(image.suffix.lower(), "application/octet-stream")
    reply = Inference.from_run(run, timeout).post(model, data, content_type, endpoint="explanations")
    try:
        body = reply.json()
    except ValueError:
        body = {"message": reply.text.strip()}
    if not reply.ok:
        raise ScriptError(f"{image.name}: HTTP {reply.status_code}: {body.get('message', body)}")
    if "attributions" not in body:
        raise ScriptError(f"{image.name}: model {model!r} answered without attributions")
    return body


def heatmap_path(image: Path) -> Path:
    """Where the heat-map of ``image`` goes: next to it."""
    return image.with_name(f"{image.stem}.explanation.png")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ScriptError("ts-explain draws with matplotlib: pip install 'serveready[explain]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_explanation(sent: Path, result: dict[str, Any], out: Path) -> Path:
    """The picture for what the handler answered: a text's shaded tokens, a clip's attributions over time, or an image's heat-map."""
    if "tokens" in result:
        return save_text_explanation(result, out)
    if "step_seconds" in result:
        return save_audio_explanation(result, out)
    return save_heatmap(sent, result, out)


def save_audio_explanation(result: dict[str, Any], out: Path) -> Path:
    """Attributions over time: a line (waveform models), or the log-mel input above its attributions per band and frame."""
    plt = _pyplot()
    import numpy as np

    attributions = np.asarray(result["attributions"], dtype=float)
    step = float(result["step_seconds"])
    top = result["predictions"][0]
    limit = float(np.abs(attributions).max()) or 1.0
    if attributions.ndim == 1:
        fig, axis = plt.subplots(figsize=(9, 3))
        axis.plot(np.arange(len(attributions)) * step, attributions, color="tab:red")
        axis.axhline(0, color="grey", linewidth=0.5)
        axis.set_xlabel("seconds")
        axis.set_ylabel("attribution")
    else:
        fig, (above, below) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
        extent = (0, attributions.shape[1] * step, 0, attributions.shape[0])
        above.imshow(np.asarray(result["input"], dtype=float), origin="lower", aspect="auto", extent=extent, cmap="magma")
        above.set_title("log-mel input (mel band over time)")
        shown = below.imshow(attributions, origin="lower", aspect="auto", extent=extent, cmap="RdBu_r", vmin=-limit, vmax=limit)
        below.set_xlabel("seconds")
        below.set_title("attributions")
        fig.colorbar(shown, ax=[above, below], fraction=0.03)
    fig.suptitle(f"predicted {top['class']} with probability {top['probability']:.3f} (red: pushed towards it)")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def save_text_explanation(result: dict[str, Any], out: Path) -> Path:
    """Each token in a box shaded by its attribution (red: towards the predicted class, blue: against), wrapped into lines."""
    plt = _pyplot()
    from matplotlib import colormaps

    tokens, values = result["tokens"], [float(v) for v in result["attributions"]]
    limit = max((abs(v) for v in values), default=0.0) or 1.0
    lines: list[list[tuple[str, float]]] = [[]]
    used = 0
    for token, value in zip(tokens, values, strict=True):
        if used + len(token) + 1 > _LINE_CHARS and lines[-1]:
            lines.append([])
            used = 0
        lines[-1].append((token, value))
        used += len(token) + 1
    fig, axis = plt.subplots(figsize=(9, 1.2 + 0.45 * len(lines)))
    axis.set_xlim(0, _LINE_CHARS)
    axis.set_ylim(len(lines), -0.5)
    axis.axis("off")
    colours = colormaps["RdBu_r"]
    for row, line in enumerate(lines):
        x = 0.0
        for token, value in line:
            axis.text(x, row + 0.3, token, family="monospace", fontsize=11, va="center",
                      bbox={"facecolor": colours(0.5 + 0.5 * value / limit), "edgecolor": "none", "pad": 2})
            x += len(token) + 1
    top = result["predictions"][0]
    axis.set_title(f"predicted {top['class']} with probability {top['probability']:.3f} (red: pushed towards it)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def save_heatmap(image: Path, result: dict[str, Any], out: Path) -> Path:
    """Draw the image, the model's input and the attributions side by side."""
    plt = _pyplot()
    import numpy as np
    from PIL import Image

    attributions = np.asarray(result["attributions"], dtype=float)
    seen = np.asarray(result["input"], dtype=float)
    if attributions.ndim == 3:  # channels first: one heat-map of all channels
        attributions = attributions.sum(axis=0)
    if seen.ndim == 3:
        seen = seen[0] if seen.shape[0] == 1 else seen.transpose(1, 2, 0)
    if seen.min() < 0 or seen.max() > 1:  # normalised inputs, shown 0..1
        seen = (seen - seen.min()) / ((seen.max() - seen.min()) or 1.0)
    limit = float(np.abs(attributions).max()) or 1.0
    top = result["predictions"][0]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    with Image.open(image) as sent:
        axes[0].imshow(sent.convert("RGB"))
    axes[0].set_title("sent")
    axes[1].imshow(seen, cmap="gray", vmin=0, vmax=1)
    axes[1].set_title(f"model input ({seen.shape[0]}x{seen.shape[1]})")
    shown = axes[2].imshow(attributions, cmap="RdBu_r", vmin=-limit, vmax=limit)
    axes[2].set_title(f"attributions for class {top['class']}")
    fig.colorbar(shown, ax=axes[2], fraction=0.046)
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    fig.suptitle(f"predicted {top['class']} with probability {top['probability']:.3f} (red: pushed towards it)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ts-explain", description="Save a picture of why the model chose its class.")
    parser.add_argument("images", nargs="+", type=Path, help="PNG or JPEG files; .txt files for a text classifier; .wav (.flac, .ogg, .mp3) for an audio one")
    parser.add_argument("--model", default="digits", help="the registered classifier to ask (default: %(default)s, as in 0.2)")
    parser.add_argument("--run-dir", type=Path, default=Path(os.environ.get("TS_RUN_DIR", "run/default")), help="the server's folder (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run = RunDir(args.run_dir.resolve())
    try:
        for image in args.images:
            result = explain(run, args.model, image)
            out = save_explanation(image, result, heatmap_path(image))
            top = result["predictions"][0]
            print(f"{image}: {top['class']} ({top['probability']:.3f}) -> {out}")
    except ServereadyError as err:
        print(f"ts-explain: error: {err.message}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
