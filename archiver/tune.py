"""``ts-archive tune NAME``: the settings to try, how to pick among them, and writing the pick into the config.

What NVIDIA's Model Analyzer does for Triton, for TorchServe: start a TorchServe on free
loopback ports, register the built archive with each candidate setting (workers x batch
size x batch delay x torch threads per worker), drive it with ``wrk`` at the concurrencies
asked for, and keep the setting that meets the p99 bound at the highest throughput.

The sweep is pruned by what the server's batch aggregator does: TorchServe 0.12's own
(``Model.pollBatch``) with ``maxBatchDelay: 0`` takes the first queued request and at most one
more, so every batch size above 2 behaves alike there (``ts-server``'s no-wait aggregator takes
what is queued up to the batch size, so there each size is its own candidate); with
``batchSize: 1`` the delay is never used. By default workers times threads never exceed the cores; thread counts
given explicitly (``--threads 1,2``) may, up to the cores per worker: for a model that computes for milliseconds in
batches, two workers of two threads each measured 1.2x the throughput of one worker of two threads at 8-32 clients
on 2 cores with a lone client as fast (a lone request has both cores), while at batch 1 the same oversubscription
costs half the throughput (OpenMP's threads spin-wait for each other); the measurements decide. Then two stages: every
candidate is screened at the lowest and highest concurrency for a short time, and only
the best ``keep`` (by the geometric mean of their requests/s) are measured at every level.
The sweep itself, which starts a TorchServe and drives it, is in ``serveready.scripts.tune``.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from serveready.handlers.archive import Archive

from .errors import ArchiverError
from .spec import ModelSpec

TUNED_MARK = "# tuned:"


@dataclass(frozen=True, order=True)
class Candidate:
    """One serving setting: TorchServe's workers, batchSize and maxBatchDelay, and torch threads per worker."""

    workers: int
    batch_size: int
    max_batch_delay: int
    threads: int

    @property
    def label(self) -> str:
        return f"w{self.workers} b{self.batch_size} d{self.max_batch_delay} t{self.threads}"


@dataclass(frozen=True)
class Point:
    """One closed-loop measurement of a candidate at one concurrency."""

    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass(frozen=True)
class Measurement:
    """A candidate and what it did at each concurrency measured."""

    candidate: Candidate
    points: tuple[Point, ...]

    @property
    def score(self) -> float:
        """Geometric mean of requests/s over the levels: a lone client counts as much as a crowd."""
        rates = [max(p.rps, 1e-9) for p in self.points]
        return math.exp(sum(math.log(r) for r in rates) / len(rates)) if rates else 0.0

    @property
    def worst_p99_ms(self) -> float:
        return max((p.p99_ms for p in self.points), default=math.inf)

    @property
    def errors(self) -> int:
        return sum(p.errors for p in self.points)

    def at(self, concurrency: int) -> Point | None:
        return next((p for p in self.points if p.concurrency == concurrency), None)

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate.__dict__, "points": [p.__dict__ for p in self.points]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measurement:
        return cls(Candidate(**data["candidate"]), tuple(Point(**p) for p in data["points"]))


def candidates(
    cores: int,
    workers: Iterable[int] = (1, 2),
    batch_sizes: Iterable[int] = (1, 4, 8, 16),
    delays: Iterable[int] = (0, 1, 5),
    threads: Iterable[int] | None = None,
    no_wait: bool = False,
) -> list[Candidate]:
    """The pruned grid (see the module docstring for the rules); ``no_wait``: the server runs ``ts-server``'s no-wait aggregator."""
    found: set[Candidate] = set()
    for w in workers:
        if w < 1 or w > cores:
            continue
        thread_counts = sorted({t for t in threads if 1 <= t <= cores} if threads else {1, cores // w})
        for t in thread_counts:
            for b in batch_sizes:
                if b == 1:
                    if w * t <= cores:  # a worker given batches of one never oversubscribes (runtime.worker_threads)
                        found.add(Candidate(w, 1, 0, t))
                    continue
                for d in delays:
                    found.add(Candidate(w, min(b, 2) if d == 0 and not no_wait else b, d, t))
    return sorted(found)


def pareto_front(measurements: Sequence[Measurement]) -> list[Measurement]:
    """The measurements no other beats on both throughput (score) and worst p99."""
    clean = [m for m in measurements if m.errors == 0]  # a setting that failed requests is no trade-off
    front = []
    for m in clean:
        dominated = any(
            o.score >= m.score and o.worst_p99_ms <= m.worst_p99_ms and (o.score > m.score or o.worst_p99_ms < m.worst_p99_ms)
            for o in clean
        )
        if not dominated:
            front.append(m)
    return sorted(front, key=lambda m: -m.score)


LONE_SLACK_MS = 0.5  # below the ~1.05 ms that any maxBatchDelay >= 1 adds for a lone client


def lone_ok(measurements: Sequence[Measurement], lone_slowdown: float | None) -> list[Measurement]:
    """The measurements whose p50 at the lowest concurrency exceeds the best one's there by at most
    ``max((lone_slowdown - 1) x best, 0.5 ms)``.

    This is how "batching must not make a lone client wait" is checked, relative to what the
    model itself costs: for a 0.03 ms model a 1 ms batch delay triples the lone p50 and is
    refused (a second worker's +0.1 ms is not); for a 30 ms model it adds 3% and is allowed.
    ``None`` or 0 turns the check off.
    """
    if not lone_slowdown:
        return list(measurements)
    level = min((p.concurrency for m in measurements for p in m.points), default=None)
    lone = [(m, m.at(level)) for m in measurements]
    best = min((p.p50_ms for m, p in lone if p is not None and m.errors == 0), default=None)
    if best is None:
        return list(measurements)
    limit = best + max((lone_slowdown - 1) * best, LONE_SLACK_MS)
    return [m for m, p in lone if p is not None and p.p50_ms <= limit]


def pick(measurements: Sequence[Measurement], p99_ms: float, lone_slowdown: float | None = None) -> Measurement | None:
    """Among error-free measurements whose p99 meets ``p99_ms`` at every level (and that pass
    :func:`lone_ok`), the highest throughput."""
    fit = [m for m in lone_ok(measurements, lone_slowdown) if m.errors == 0 and m.worst_p99_ms <= p99_ms]
    return max(fit, key=lambda m: (m.score, -m.worst_p99_ms), default=None)


# -- writing the choice back -----------------------------------------------------

def set_section_keys(text: str, section: str, values: Mapping[str, Any]) -> str:
    """``text`` (a YAML file) with ``section``'s keys set to ``values``, comments and order kept.

    Only top-level sections of ``key: value`` lines are edited; missing keys and sections are added.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(rf"^{re.escape(section)}:\s*(#.*)?$", line)), None)
    if start is None:
        lines += ["", f"{section}:"]
        start = len(lines) - 1
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith((" ", "\t"))):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    body = lines[start + 1:end]
    indent = next((re.match(r"^(\s+)", line).group(1) for line in body if line.strip() and not line.strip().startswith("#")), "  ")  # type: ignore[union-attr]
    for key, value in values.items():
        rendered = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        pattern = re.compile(rf"^{indent}{re.escape(key)}:(\s*)([^#\n]*?)(\s*#.*)?$")
        for i, line in enumerate(body):
            match = pattern.match(line)
            if match:
                comment = match.group(3) or ""
                body[i] = f"{indent}{key}: {rendered}{comment}"
                break
        else:
            body.append(f"{indent}{key}: {rendered}")
    return "\n".join(lines[:start + 1] + body + lines[end:]) + "\n"


def write_choice(config_file: Path, chosen: Measurement, note: str) -> None:
    """Put ``chosen`` into ``config_file``'s ``serve:`` (and ``handler.torch_threads``), with a comment above ``serve:``."""
    text = config_file.read_text()
    c = chosen.candidate
    text = set_section_keys(text, "serve", {"minWorkers": c.workers, "maxWorkers": c.workers, "batchSize": c.batch_size, "maxBatchDelay": c.max_batch_delay})
    text = set_section_keys(text, "handler", {"torch_threads": c.threads})
    lines = [line for line in text.splitlines() if not line.startswith(TUNED_MARK)]
    at = lines.index("serve:") if "serve:" in lines else next(i for i, line in enumerate(lines) if line.startswith("serve:"))
    lines[at:at] = [f"{TUNED_MARK} {part}" for part in note.splitlines()]
    text = "\n".join(lines) + "\n"
    loaded = yaml.safe_load(text)
    serve = loaded.get("serve") or {}
    if (serve.get("minWorkers"), serve.get("batchSize"), serve.get("maxBatchDelay"), (loaded.get("handler") or {}).get("torch_threads")) != (c.workers, c.batch_size, c.max_batch_delay, c.threads):
        raise ArchiverError(f"could not write the tuned settings into {config_file}: edit its serve: section by hand ({c.label})")
    config_file.write_text(text)


def with_threads(archive: Path, threads: int, target: Path) -> Path:
    """A copy of ``archive`` whose model-config sets ``handler.torch_threads`` (the register call cannot)."""
    Archive(archive).rewrite(target, lambda config: config.setdefault("handler", {}).update(torch_threads=threads))
    return target


# -- the sweep ------------------------------------------------------------------

@dataclass(frozen=True)
class SweepPlan:
    """What to measure and for how long."""

    levels: tuple[int, ...]
    seconds: float = 2.5
    screen_seconds: float = 1.5
    keep: int = 3
    repeats: int = 3
    warmup_seconds: float = 20.0
    lone_slowdown: float | None = 1.25


def median(points: Sequence[Point]) -> Point:
    """One point from repeats: the median of each number (a stall in one repeat does not decide)."""
    return Point(points[0].concurrency, round(statistics.median(p.rps for p in points), 1), round(statistics.median(p.p50_ms for p in points), 3),
                 round(statistics.median(p.p99_ms for p in points), 3), sum(p.errors for p in points))


# -- reporting ------------------------------------------------------------------

def table(measurements: Sequence[Measurement], levels: Sequence[int], chosen: Measurement | None, front: Sequence[Measurement]) -> str:
    """A Markdown table: one row per candidate, req/s and p99 per level."""
    on_front = {m.candidate for m in front}
    head = "| setting | " + " | ".join(f"c={c} req/s (p99 ms)" for c in levels) + " | geo-mean req/s | errors | |"
    rows = [head, "|---|" + "---:|" * len(levels) + "---:|---:|---|"]
    for m in sorted(measurements, key=lambda m: (-len(m.points), -m.score)):
        cells = []
        for c in levels:
            p = m.at(c)
            cells.append(f"{p.rps:,.0f} ({p.p99_ms:.1f})" if p else "")
        mark = "**chosen**" if chosen and m.candidate == chosen.candidate else ("Pareto" if m.candidate in on_front else "")
        if len(m.points) < len(levels):
            mark = (mark + " screened only").strip()
        rows.append(f"| {m.candidate.label} | " + " | ".join(cells) + f" | {m.score:,.0f} | {m.errors} | {mark} |")
    return "\n".join(rows)


def concurrency_axes(rps: Any, p99: Any, levels: Sequence[int], title: str = "") -> None:
    """Label a pair of matplotlib axes: req/s and p99 (log) against concurrent clients (log 2)."""
    for ax, label in ((rps, "requests/s"), (p99, "p99 latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(levels), [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if title:
            ax.set_title(f"{title}: {label}")
    p99.set_yscale("log")


def plot(measurements: Sequence[Measurement], levels: Sequence[int], chosen: Measurement | None, path: Path, title: str) -> Path:
    """Throughput and p99 against concurrency, one line per fully measured candidate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ArchiverError("the tuning plot needs matplotlib: pip install 'serveready[bench]'") from None
    full = [m for m in measurements if len(m.points) == len(levels)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in full:
        xs = [p.concurrency for p in m.points]
        bold = chosen is not None and m.candidate == chosen.candidate
        style = {"linewidth": 3 if bold else 1.3, "marker": "o"}
        left.plot(xs, [p.rps for p in m.points], label=m.candidate.label + (" (chosen)" if bold else ""), **style)
        right.plot(xs, [p.p99_ms for p in m.points], **style)
    concurrency_axes(left, right, levels)
    left.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)
    return path


def report(name: str, measurements: Sequence[Measurement], plan: SweepPlan, p99_ms: float, chosen: Measurement | None, out: Path, machine: str) -> Path:
    """``out/NAME.md`` (table, Pareto front, choice), ``NAME.png`` and ``NAME.json`` (the raw measurements)."""
    out.mkdir(parents=True, exist_ok=True)
    front = pareto_front([m for m in measurements if len(m.points) == len(plan.levels)])  # like with like
    png = plot(measurements, plan.levels, chosen, out / f"{name}.png", f"{name}: candidates measured at every level")
    (out / f"{name}.json").write_text(json.dumps({
        "model": name, "date": datetime.date.today().isoformat(), "machine": machine, "p99_ms": p99_ms,
        "levels": list(plan.levels), "seconds": plan.seconds, "screen_seconds": plan.screen_seconds, "repeats": plan.repeats, "lone_slowdown": plan.lone_slowdown,
        "chosen": chosen.candidate.__dict__ if chosen else None, "measurements": [m.to_dict() for m in measurements],
    }, indent=1) + "\n")
    lines = [
        f"# Tuning `{name}`",
        "",
        f"`ts-archive tune {name}` on {machine}, {datetime.date.today().isoformat()}: `wrk` closed loop, one JSON/PNG body,",
        f"{plan.screen_seconds:g} s per level to screen, then the best {plan.keep} side by side, {plan.repeats} interleaved repeats of {plan.seconds:g} s "
        f"per level (medians); p99 bound {p99_ms:g} ms.",
        "Setting `wW bB dD tT`: W workers, batchSize B, maxBatchDelay D ms, T torch threads per worker.",
        "Repeats here differ by up to 30%: compare rows of one run.",
        "",
        table(measurements, plan.levels, chosen, front),
        "",
        "Pareto front (throughput vs worst p99): " + (", ".join(f"{m.candidate.label} ({m.score:,.0f}/s, p99 ≤ {m.worst_p99_ms:.1f} ms)" for m in front) or "none"),
        "",
        (f"Chosen: **{chosen.candidate.label}**, the highest geometric-mean throughput whose p99 stays within {p99_ms:g} ms at every level"
         + (f" and whose p50 at {min(plan.levels)} client(s) is within {plan.lone_slowdown:g}x (or +{LONE_SLACK_MS:g} ms) of the best there"
            " (a lone client does not wait for a batch)."
            if plan.lone_slowdown else ".")
         if chosen else f"No setting kept p99 within {p99_ms:g} ms at every level without errors"
         + (f" and a lone client's p50 within {plan.lone_slowdown:g}x (or +{LONE_SLACK_MS:g} ms) of the best" if plan.lone_slowdown else "")
         + ": nothing was written."),
        "",
        f"![{name}]({png.name})",
        "",
    ]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines))
    return path


def note_for(chosen: Measurement, p99_ms: float, machine: str) -> str:
    """The comment written above ``serve:``."""
    top = max(chosen.points, key=lambda p: p.concurrency)
    low = min(chosen.points, key=lambda p: p.concurrency)
    return (f"ts-archive tune, {datetime.date.today().isoformat()}, {machine}: {chosen.candidate.label} (p99 bound {p99_ms:g} ms);\n"
            f"c={low.concurrency}: {low.rps:,.0f} req/s p50 {low.p50_ms:.2f} ms; c={top.concurrency}: {top.rps:,.0f} req/s p99 {top.p99_ms:.1f} ms. "
            "See docs/tuning.md.")


def default_request(spec: ModelSpec) -> tuple[bytes, str]:
    """A representative request for the built-in handlers: one JSON row, or a PNG of the model's input size."""
    from serveready.handlers.image_classifier import ImageClassifierHandler
    from serveready.handlers.tabular import TabularHandler

    cls = spec.handler.handler_class
    if issubclass(cls, TabularHandler):
        width = getattr(spec.handler_options, "input_width", None) or spec.sample_shape[-1]
        return json.dumps({"inputs": [0.5] * int(width)}).encode(), "application/json"
    if issubclass(cls, ImageClassifierHandler):
        from PIL import Image, ImageDraw

        side = max(int(spec.sample_shape[-1]), 64)
        image = Image.new("RGB", (side, side), "white")
        ImageDraw.Draw(image).ellipse((side // 4, side // 6, 3 * side // 4, 5 * side // 6), outline="black", width=max(side // 10, 1))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"
    raise ArchiverError(f"no built-in request for handler {cls.__name__}: give one with --body FILE --content-type TYPE")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def store_archive(store: Path, name: str) -> Path:
    """The built archive ``store/NAME.mar``, or an error that says how to build it."""
    archive = store / f"{name}.mar"
    if not archive.is_file():
        raise ArchiverError(f"{archive} does not exist: ts-archive build {name} first")
    return archive


__all__ = [
    "Candidate", "Measurement", "Point", "SweepPlan", "candidates", "store_archive", "cores", "default_request",
    "lone_ok", "median", "note_for", "pareto_front", "pick", "plot", "report", "set_section_keys", "table", "with_threads", "write_choice",
]

