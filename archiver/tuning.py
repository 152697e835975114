"""``ts-archive tune``: the command around :mod:`.tune` (load the spec, sweep or re-read, report, write back)."""

from __future__ import annotations

import argparse
import json
import sys

from serveready.handlers.runtime import machine

from .errors import ArchiverError
from .spec import load_specs
from .tune import LONE_SLACK_MS, Measurement, SweepPlan, candidates, cores, default_request, note_for, pick, report, store_archive, sweep, write_choice


def tune_command(args: argparse.Namespace) -> int:
    """Measure (or re-read) the candidates for one model, report them, and write the pick into its config."""
    [spec] = load_specs(args.configs, [args.name])
    plan = SweepPlan(levels=tuple(sorted(set(args.concurrency))), seconds=args.seconds, screen_seconds=args.screen_seconds,
                     keep=args.keep, repeats=max(args.repeats, 1), warmup_seconds=args.warmup, lone_slowdown=args.lone_slowdown or None)
    if min(plan.levels) < 1:
        raise ArchiverError("--concurrency levels must be at least 1")
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
        grid = candidates(cores(), args.workers, args.batch_sizes, args.delays, args.threads)
        if not grid:
            raise ArchiverError("no candidate settings left: check --workers, --batch-sizes and --threads against this machine's cores")
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
