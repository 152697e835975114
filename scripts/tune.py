"""``ts-archive tune NAME``: measure serving settings on a TorchServe of its own and write the best into the config.

What NVIDIA's Model Analyzer does for Triton, for TorchServe: start a TorchServe on free
loopback ports, register the built archive with each candidate setting (workers x batch
size x batch delay x torch threads per worker, pruned by :func:`serveready.archiver.tune.candidates`),
drive it with ``wrk`` at the concurrencies asked for, and keep the setting that meets the p99
bound at the highest throughput (:func:`serveready.archiver.tune.pick`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from serveready.archiver.spec import load_specs
from serveready.archiver.tune import (
    LONE_SLACK_MS,
    Candidate,
    Measurement,
    Point,
    SweepPlan,
    candidates,
    cores,
    default_request,
    lone_ok,
    median,
    note_for,
    pick,
    report,
    store_archive,
    with_threads,
    write_choice,
)
from serveready.handlers.runtime import machine

from . import batching
from .client import Management
from .loadgen import Load, run_wrk, wrk_path
from .runinfo import RunDir, ScriptError, TokenKind
from .server import isolated, java_binary, start, stop

Progress = Callable[[str], None]


def sweep(archive: Path, body: bytes, content_type: str, grid: Sequence[Candidate], plan: SweepPlan, progress: Progress) -> list[Measurement]:
    """Measure ``grid`` on a TorchServe of our own: screen each at the lowest and highest concurrency, then the
    best ``keep`` side by side at every level, ``repeats`` times interleaved (medians)."""
    wrk_path()
    with tempfile.TemporaryDirectory(prefix="ts-tune-") as tmp:
        store = Path(tmp, "store")
        store.mkdir()
        request = Path(tmp, "request.body")
        request.write_bytes(body)
        for t in sorted({c.threads for c in grid}):
            with_threads(archive, t, store / f"tune_t{t}.mar")
        try:
            run = start(isolated(Path(tmp, "run"), store))
        except ScriptError as err:
            raise ScriptError(f"could not start TorchServe for tuning: {err.message}") from None
        try:
            bench = _Bench(run, request, content_type, progress)
            screened = _screen(bench, grid, plan, progress)
            # Finalists: the best that pass the lone-client check at screening, plus the best that
            # does not (measured beside them, it shows what waiting for a batch would buy).
            passing = lone_ok(screened, plan.lone_slowdown)
            best = sorted(passing, key=lambda m: -m.score)[: plan.keep]
            waiting = sorted((m for m in screened if m not in passing), key=lambda m: -m.score)[:1]
            finalists = [m.candidate for m in best + waiting]
            return _final(bench, finalists, plan, progress) + [m for m in screened if m.candidate not in finalists]
        except ScriptError as err:
            raise ScriptError(f"tuning failed: {err.message}") from None
        finally:
            stop(run.path)


class _Bench:
    """The tuning server: candidates registered under names of their own, and wrk points against them."""

    def __init__(self, run: RunDir, request: Path, content_type: str, progress: Progress) -> None:
        self.run, self.request, self.content_type, self.progress = run, request, content_type, progress
        self.management = Management.from_run(run)
        self.token = run.token(TokenKind.INFERENCE)

    def register(self, c: Candidate) -> Load:
        self.management.register(f"tune_t{c.threads}.mar", name=_model_name(c), workers=c.workers, batch_size=c.batch_size,
                                 max_batch_delay=c.max_batch_delay)
        return Load(f"{self.run.inference_url}/predictions/{_model_name(c)}", self.request, self.content_type, self.token)

    def unregister(self, c: Candidate) -> None:
        try:
            self.management.unregister(_model_name(c))
        except ScriptError as err:  # it stays registered, idle, under a name no later candidate uses
            self.progress(f"  (could not unregister {_model_name(c)}: {err.message})")

    @staticmethod
    def point(load: Load, level: int, seconds: float) -> Point:
        r = run_wrk(load, level, seconds)
        return Point(level, round(r.rps, 1), round(r.p50_ms, 3), round(r.p99_ms, 3), r.errors)


def _screen(bench: _Bench, grid: Sequence[Candidate], plan: SweepPlan, progress: Progress) -> list[Measurement]:
    """Stage 1: one candidate at a time, at the lowest and highest concurrency."""
    levels = tuple(sorted({min(plan.levels), max(plan.levels)}))
    screened = []
    for i, c in enumerate(grid, 1):
        load = bench.register(c)
        try:
            run_wrk(load, max(levels), plan.warmup_seconds if i == 1 else 1)  # not measured
            m = Measurement(c, tuple(bench.point(load, level, plan.screen_seconds) for level in levels))
        finally:
            bench.unregister(c)
        screened.append(m)
        progress(f"[screen {i}/{len(grid)}] {c.label}: " + ", ".join(f"c={p.concurrency} {p.rps:,.0f}/s p99 {p.p99_ms:.1f} ms" for p in m.points))
    return screened


def _final(bench: _Bench, finalists: list[Candidate], plan: SweepPlan, progress: Progress) -> list[Measurement]:
    """Stage 2: the finalists side by side, every level, interleaved and repeated; medians."""
    loads = {c: bench.register(c) for c in finalists}
    try:
        for load in loads.values():
            run_wrk(load, max(plan.levels), 1)
        samples: dict[tuple[Candidate, int], list[Point]] = {}
        total, done = plan.repeats * len(plan.levels) * len(finalists), 0
        for rep in range(plan.repeats):
            order = finalists[rep % len(finalists):] + finalists[:rep % len(finalists)]
            for level in plan.levels:
                for c in order:
                    sample = bench.point(loads[c], level, plan.seconds)
                    samples.setdefault((c, level), []).append(sample)
                    done += 1
                    progress(f"[measure {done}/{total}] {c.label}: c={level} {sample.rps:,.0f}/s p50 {sample.p50_ms:.2f} p99 {sample.p99_ms:.1f} ms")
    finally:
        for c in loads:
            bench.unregister(c)
    return [Measurement(c, tuple(median(samples[(c, level)]) for level in plan.levels)) for c in finalists]


def _model_name(c: Candidate) -> str:
    """The name a candidate is registered under on the tuning server."""
    return "tune_" + c.label.replace(" ", "_")


def tune_command(args: argparse.Namespace) -> int:
    """Measure (or re-read) the candidates for one model, report them, and write the pick into its config."""
    [spec] = load_specs(args.configs, [args.name])
    plan = SweepPlan(levels=tuple(sorted(set(args.concurrency))), seconds=args.seconds, screen_seconds=args.screen_seconds,
                     keep=args.keep, repeats=max(args.repeats, 1), warmup_seconds=args.warmup, lone_slowdown=args.lone_slowdown or None)
    if min(plan.levels) < 1:
        raise ScriptError("--concurrency levels must be at least 1")
    where = machine()
    if args.from_json:
        recorded = json.loads(args.from_json.read_text())
        measurements = [Measurement.from_dict(m) for m in recorded["measurements"]]
        plan = SweepPlan(levels=tuple(recorded["levels"]), seconds=recorded["seconds"], screen_seconds=recorded["screen_seconds"], keep=plan.keep,
                         repeats=recorded.get("repeats", 1), lone_slowdown=plan.lone_slowdown)
        where = recorded.get("machine", where)
    else:
        archive = store_archive(args.store, spec.name)
        body, content_type = (args.body.read_bytes(), args.content_type) if args.body else default_request(spec)
        aggregator, _ = batching.probe(java_binary())
        where = f"{where}, {aggregator.mode} batching"
        grid = candidates(cores(), args.workers, args.batch_sizes, args.delays, args.threads, no_wait=aggregator.mode == "no-wait")
        if not grid:
            raise ScriptError("no candidate settings left: check --workers, --batch-sizes and --threads against this machine's cores")
        print(f"tuning {spec.name}: {len(grid)} settings screened at c={min(plan.levels)} and c={max(plan.levels)}, "
              f"the best {plan.keep} measured at c={','.join(map(str, plan.levels))}", file=sys.stderr)
        measurements = sweep(archive, body, content_type, grid, plan, lambda line: print(line, file=sys.stderr, flush=True))
    finalists = [m for m in measurements if len(m.points) == len(plan.levels)]
    chosen = pick(finalists, args.p99_ms, plan.lone_slowdown)
    path = report(spec.name, measurements, plan, args.p99_ms, chosen, args.out, where)
    print(path.read_text())
    if chosen is None:
        lone = f" with a lone client's p50 within {plan.lone_slowdown:g}x (or +{LONE_SLACK_MS:g} ms) of the best" if plan.lone_slowdown else ""
        print(f"ts-archive: no setting met p99 <= {args.p99_ms:g} ms at every level{lone}; {spec.source} is unchanged", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"--dry-run: {spec.source} is unchanged", file=sys.stderr)
        return 0
    write_choice(spec.source, chosen, note_for(chosen, args.p99_ms, where))
    print(f"wrote {chosen.candidate.label} into {spec.source} (serve:, handler.torch_threads): `ts-archive build {spec.name}` packs it", file=sys.stderr)
    return 0
