"""HTTP benchmark of served models through a real TorchServe (also ``ts-bench``; ``make bench``).

Starts its own TorchServe (run/bench, free ports), registers the models, warms the
Java frontend up (it gets 2-3x faster over its first ~30 s of traffic), then drives
each model in turn with concurrent clients and writes docs/bench.md. Timings vary by
up to 30% between runs here: compare rows of one run, never across runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

from serveready.handlers.runtime import machine

from .client import Inference, Management
from .runinfo import RunDir, ScriptError
from .server import isolated, start, stop

DEFAULT_MODELS = "net,net_int8,net_onnx,net_exported,digits,digits_int8,digits_int8_static,digits_bf16,digits_pruned_structured,digits_distilled,digits_onnx,digits_exported"
ROW = json.dumps({"inputs": [0.1, -0.2, 0.3, 0.0, 1.5, -1.0, 0.7, 0.2, -0.4, 0.9]}).encode()


@dataclass(frozen=True)
class Result:
    model: str
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    def row(self) -> str:
        lat = sorted(self.latencies_ms) or [float("nan")]
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
        return f"| {self.model} | {self.requests / self.seconds:.0f} | {statistics.median(lat):.1f} | {pct(0.9):.1f} | {pct(0.99):.1f} | {self.errors} |"


def _payload(model: str, image: Path) -> tuple[bytes, str]:
    return (image.read_bytes(), "image/png") if model.startswith("digits") else (ROW, "application/json")


def drive(run: RunDir, model: str, payload: tuple[bytes, str], seconds: float, clients: int) -> Result:
    """``clients`` threads posting ``payload`` to ``model`` for ``seconds``."""
    inference = Inference.from_run(run)
    url = f"{inference.url}/predictions/{model}"
    headers = inference.headers(payload[1])  # no Authorization header when token authorization is off
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            begin = time.perf_counter()
            reply = session.post(url, data=payload[0], headers=headers, timeout=30)
            took = (time.perf_counter() - begin) * 1000
            with lock:
                latencies.append(took)
                errors[0] += reply.status_code != 200

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return Result(model, len(latencies), errors[0], time.monotonic() - started, latencies)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ts-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated archive names in the model store")
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per model (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of warm-up traffic over all models (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="TorchServe batch size per model (default: %(default)s; the archives' own batching waits up to maxBatchDelay)")
    parser.add_argument("--max-batch-delay", type=int, default=5, help="ms to wait to fill a batch (default: %(default)s)")
    parser.add_argument("--image", type=Path, default=Path("docs/images/digit.png"))
    parser.add_argument("--out", type=Path, default=Path("docs/bench.md"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    config = isolated(Path("run/bench"), args.model_store)
    try:
        run = start(config)
    except ScriptError as err:
        print(f"ts-bench: error: {err.message}", file=sys.stderr)
        return 1
    try:
        management = Management.from_run(run)
        for i, model in enumerate(models, 1):
            print(f"[{i}/{len(models)}] registering {model}", file=sys.stderr)
            try:
                management.register(f"{model}.mar", batch_size=args.batch_size, max_batch_delay=args.max_batch_delay)
            except ScriptError as err:
                print(f"ts-bench: error: {err.message}", file=sys.stderr)
                return 1
        print(f"warming up the frontend for {args.warmup:.0f}s ...", file=sys.stderr)
        share = args.warmup / len(models)
        for model in models:
            drive(run, model, _payload(model, args.image), share, args.clients)
        results = []
        for i, model in enumerate(models, 1):
            result = drive(run, model, _payload(model, args.image), args.seconds, args.clients)
            print(f"[{i}/{len(models)}] {result.row()}", file=sys.stderr)
            results.append(result)
    finally:
        stop(run.path)
    lines = [
        "# HTTP benchmark",
        "",
        f"`make bench` on {machine()}, {datetime.date.today().isoformat()}: one TorchServe, one worker per model",
        f"(batch size {args.batch_size}, max batch delay {args.max_batch_delay} ms)",
        f"(one torch thread each), {args.clients} concurrent clients with keep-alive, {args.seconds:.0f} s per model after",
        f"{args.warmup:.0f} s of warm-up over all models. `net_*`: one JSON row; `digits_*`: a 96x96 PNG.",
        "Repeats here differ by up to 30%: compare rows of one run.",
        "",
        "| model | requests/s | p50 ms | p90 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|",
        *[r.row() for r in results],
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
