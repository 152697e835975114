"""ts-gpu-check: every archive of a model store on GPU workers of a real TorchServe, checked against the CPU.

    ts-gpu-check                                     # model_store/*.mar on GPU workers; docs/gpu/check.{json,md}
    ts-gpu-check --data data/x.pt --models mine      # your archive, its inputs from your held-out rows
    ts-gpu-check --device cpu --out /tmp/cpu-check   # the same run on CPU workers (machines without a GPU)

For each archive: register it (1 worker) on the device, read back what the worker says it runs
with, send it Open Inference Protocol v2 requests and compare the output tensors with the same
archive answering in-process on this machine's CPU (``serveready.load``): within 1e-3, or a few
units in the last place of the largest output for half precision; for classifiers (outputs that
are probabilities) the top class must also agree on 98% of the inputs. The inputs are the
``x_test`` rows of a ``--data`` file (a ``torch.save``'d dict, as a config's ``data:`` file) whose
shape fits the archive, else seeded random ones of the archive's ``model.sample_shape``; the
handler's ``instance_of`` makes each into a request (the digits example's, into ink counts).
Then a short load per archive (``--clients`` x ``--requests``, every answer compared with the
CPU's), the worker's GPU memory (nvidia-smi), and in-process forward times on the device.

Exit status 0 when every archive served right (or was refused with its reason) and no answer was a 5xx.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
import torch

import serveready
from serveready.handlers.archive import Archive
from serveready.handlers.config import DeviceType
from serveready.handlers.errors import InvalidInput, ServereadyError
from serveready.handlers.host import Model
from serveready.handlers.inputs import Inputs, as_inputs, select
from serveready.handlers.inputs import rows as rows_of
from serveready.handlers.runtime import machine

from .client import Inference, Management
from .runinfo import RunDir, ScriptError
from .server import detect_gpus, isolated, start, stop

#: inputs per archive, sent as one v2 request each chunk of the handler's max_instances
DEFAULT_ROWS = 64
#: device outputs against the same archive on the CPU: 1e-3, or for half precision
#: this many units in the last place of the largest output
FP32_TOLERANCE = 1e-3
HALF_ULPS = 8
#: top classes that must agree with the same archive on the CPU (classifiers)
MIN_AGREEMENT = 0.98


@dataclass
class ArchiveCheck:
    """One archive on one device: did it serve, how right, and what it held."""

    name: str
    format: str
    outcome: str = "failed"  # served | refused | failed
    detail: str = ""
    runs_with: str = ""
    measure: dict[str, float] = field(default_factory=dict)
    gpu_mib: float | None = None
    statuses: dict[str, int] = field(default_factory=dict)


@dataclass
class LoadCheck:
    name: str
    clients: int
    requests: int
    seconds: float
    statuses: dict[str, int]
    wrong: int

    @property
    def req_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


# -- what runs where ----------------------------------------------------------------

def environment(device: DeviceType) -> dict[str, Any]:
    """The machine, the card and the runtimes, for the report."""
    found: dict[str, Any] = {"machine": machine(), "date": datetime.date.today().isoformat(), "device": device.value,
                             "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": None}
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
    try:
        import onnxruntime

        found["onnxruntime"] = f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"
    except ImportError:
        found["onnxruntime"] = None
    return found


def gpu_memory_mib() -> dict[int, float]:
    """GPU memory per process id, from nvidia-smi ({} without one)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {}
    done = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"], capture_output=True, text=True)
    found = {}
    for line in done.stdout.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip().isdigit() and used.strip().replace(".", "", 1).isdigit():
            found[int(pid)] = float(used)
    return found


# -- requests and their answers -----------------------------------------------------

def model_inputs(reference: Model, data: Sequence[Inputs], rows: int) -> Inputs:
    """``rows`` model inputs for an archive: the first data file's that fit its sample inputs (same inputs, the
    same sizes where they do not vary), else seeded random ones (numbers in [0, 1), token ids from 5 to 99)."""
    engine = reference.engine
    sample = engine.sample_inputs
    varying = set(engine.handler.dynamic_dims(engine.options, engine.model_options))
    for x_test in data:
        if len(x_test) == len(sample) and all(
            t.ndim == s.ndim and t.is_floating_point() == s.is_floating_point()
            and all(a == b for d, (a, b) in enumerate(zip(t.shape, s.shape, strict=True)) if d and d not in varying)
            for t, s in zip(x_test, sample, strict=True)
        ):
            return tuple(t[:rows] for t in x_test)
    generator = torch.Generator().manual_seed(11)
    return tuple(torch.rand((rows, *s.shape[1:]), generator=generator) if s.is_floating_point()
                 else (torch.randint(5, 100, (rows, *s.shape[1:]), generator=generator) if i == 0 else torch.ones((rows, *s.shape[1:]), dtype=torch.long))
                 for i, s in enumerate(sample))


def v2_bodies(reference: Model, inputs: Inputs) -> list[bytes]:
    """Open Inference Protocol v2 requests carrying ``inputs`` (as the handler's ``instance_of`` makes each row
    a request input: numbers as FP32, texts as BYTES), as many as the handler's max_instances allows each."""
    handler = reference.handler
    count = rows_of(inputs)
    per = max(1, min(handler.max_instances, count))
    bodies = []
    for first in range(0, count, per):
        chunk = [select(inputs, i) for i in range(first, min(first + per, count))]
        try:
            values = [handler.instance_of(row[0] if len(row) == 1 else row) for row in chunk]
        except InvalidInput:  # inputs that cannot be turned back into requests (log-mel features): the handler's samples
            values = [handler.sample_instance(first + i) for i in range(len(chunk))]
        if all(isinstance(v, str) for v in values):
            spec = {"name": "input", "shape": [len(values)], "datatype": "BYTES", "data": values}
        else:
            numbers = torch.tensor(values, dtype=torch.float32)
            spec = {"name": "input", "shape": list(numbers.shape), "datatype": "FP32", "data": numbers.flatten().tolist()}
        bodies.append(json.dumps({"inputs": [spec]}).encode())
    return bodies


def outputs_of(answer: Any) -> dict[str, torch.Tensor]:
    """A v2 answer's output tensors by name."""
    return {o["name"]: torch.tensor(o["data"], dtype=torch.float64).reshape(o["shape"]) for o in answer["outputs"]}


def tolerance(config: dict[str, Any], outputs: torch.Tensor) -> float:
    """How far the device may be from the CPU for this archive: its dtype's rounding, at the outputs' scale."""
    model = config.get("model") or {}
    if model.get("format") != "half":
        return FP32_TOLERANCE
    eps = torch.finfo(getattr(torch, model.get("dtype") or "float16")).eps
    return max(FP32_TOLERANCE, HALF_ULPS * eps * float(outputs.abs().max()))


def _is_probabilities(values: torch.Tensor) -> bool:
    return values.ndim == 2 and values.shape[1] > 1 and bool(((values.sum(dim=1) - 1).abs() < 1e-3).all()) and bool((values >= 0).all())


def compare(served: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], bound: float) -> tuple[bool, dict[str, float], str]:
    """Whether the device's outputs match the CPU's: every output within ``bound``, classifiers' top classes agreeing."""
    if set(served) != set(expected) or any(served[k].shape != expected[k].shape for k in expected):
        return False, {}, f"outputs {sorted((k, list(v.shape)) for k, v in served.items())} differ from the CPU's {sorted((k, list(v.shape)) for k, v in expected.items())}"
    gap = max(float((served[k] - expected[k]).abs().max()) for k in expected)
    measure = {"max_abs_diff_vs_cpu": gap, "tolerance": bound}
    ok = gap <= bound
    detail = f"max |device - CPU| {gap:.2e} (tolerance {bound:.1e})"
    for name, values in expected.items():
        if _is_probabilities(values):
            agreement = float((served[name].argmax(dim=1) == values.argmax(dim=1)).double().mean())
            measure["top_class_agreement"] = agreement
            ok = ok and agreement >= MIN_AGREEMENT
            detail += f"; top class as on the CPU for {agreement:.3f} of the inputs"
    return ok, measure, detail


def _count(statuses: dict[str, int], status: int) -> None:
    statuses[str(status)] = statuses.get(str(status), 0) + 1


def _reference_answers(reference: Model, bodies: Sequence[bytes]) -> list[Any]:
    answers = [reference.predict(body, "application/json") for body in bodies]
    bad = [a for a in answers if not a.ok]
    if bad:
        raise ScriptError(f"{reference.name}: the CPU reference refused its own inputs: {bad[0].body[:300].decode(errors='replace')}")
    return [a.json() for a in answers]


def check_archive(management: Management, api: Inference, archive: Path, device: DeviceType, data: Sequence[Inputs], rows: int,
                  scratch: Path) -> tuple[ArchiveCheck, list[bytes], list[Any]]:
    """Register, compare, note memory, unregister; also the bodies and CPU answers the load reuses."""
    name = archive.name.removesuffix(".mar")
    config = Archive(archive).config
    check = ArchiveCheck(name, (config.get("model") or {}).get("format", "eager"))
    with serveready.load(archive, "cpu", threads=0, into=scratch / f"cpu-{name}") as reference:
        bodies = v2_bodies(reference, model_inputs(reference, data, rows))
        expected = _reference_answers(reference, bodies)
    try:
        registration = management.register(archive.name, name=name, workers=1, device=device)
    except ServereadyError as err:
        check.outcome, check.detail = "refused", err.message
        return check, bodies, expected
    check.runs_with = registration.runs_with
    try:
        served: dict[str, list[torch.Tensor]] = {}
        for body in bodies:
            reply = api.post(name, body, "application/json")
            _count(check.statuses, reply.status_code)
            if reply.status_code != 200:
                check.detail = f"HTTP {reply.status_code}: {reply.text[:300]}"
                return check, bodies, expected
            for key, values in outputs_of(reply.json()).items():
                served.setdefault(key, []).append(values)
        want: dict[str, list[torch.Tensor]] = {}
        for answer in expected:
            for key, values in outputs_of(answer).items():
                want.setdefault(key, []).append(values)
        got = {k: torch.cat(v) for k, v in served.items()}
        wanted = {k: torch.cat(v) for k, v in want.items()}
        ok, check.measure, check.detail = compare(got, wanted, max(tolerance(config, v) for v in wanted.values()))
        check.outcome = "served" if ok else "failed"
        check.detail = f"{sum(len(v) for v in wanted.values()) // max(len(wanted), 1)} inputs: {check.detail}"
        pids = [w.get("pid") for w in management.describe(name)[0].get("workers", [])]
        memory = gpu_memory_mib()
        if memory:
            check.gpu_mib = sum(memory.get(int(pid), 0.0) for pid in pids if pid)
    finally:
        management.unregister(name)
    return check, bodies, expected


def load(api: Inference, name: str, body: bytes, expected: Any, bound: float, clients: int, per_client: int) -> LoadCheck:
    """``clients`` threads each sending ``per_client`` copies of ``body``; every answer compared with the CPU's."""
    statuses: dict[str, int] = {}
    want = outputs_of(expected)

    def client(_: int) -> list[tuple[int, bool]]:
        with requests.Session() as session:
            seen = []
            for _ in range(per_client):
                reply = session.post(f"{api.url}/predictions/{name}", data=body, headers=api.headers("application/json"), timeout=api.timeout)
                right = reply.status_code == 200 and compare(outputs_of(reply.json()), want, bound)[0]
                seen.append((reply.status_code, right))
            return seen

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [item for chunk in pool.map(client, range(clients)) for item in chunk]
    seconds = time.perf_counter() - began
    for status, _ in results:
        _count(statuses, status)
    return LoadCheck(name, clients, len(results), seconds, statuses, sum(not right for _, right in results))


# -- in-process timings ----------------------------------------------------------------

def timings(archive: Path, device: torch.device, scratch: Path, batches: Sequence[int] = (1, 64), repeats: int = 200) -> list[dict[str, Any]]:
    """Milliseconds per forward of ``archive`` on ``device`` as the engine runs it (copy in, compute, copy out)."""
    rows = []
    with serveready.load(archive, str(device), threads=0, into=scratch / f"time-{archive.stem}") as model:
        sample = model.engine.sample_inputs
        for batch in batches:
            # Numbers random in [0, 1); integer inputs (token ids, masks) as the sample has them.
            inputs = tuple(torch.rand((batch, *t.shape[1:])) if t.is_floating_point() else t[:1].expand(batch, *t.shape[1:]) for t in sample)
            ms = _time(model.engine.inference, inputs, device, repeats)
            rows.append({"archive": archive.stem, "batch": batch, "ms": ms, "engine": model.runs_with})
    return rows


def _time(run: Any, inputs: tuple[torch.Tensor, ...], device: torch.device, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 20):
        sync()
        began = time.perf_counter()
        run(inputs)
        sync()
        if i >= 20:
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


# -- the run ----------------------------------------------------------------------

@contextmanager
def serving(store: Path, scratch: Path, gpus: int, logs: Path | None = None) -> Iterator[RunDir]:
    """A TorchServe for the check; its logs are copied to ``logs`` when it stops (the run folder is scratch)."""
    run = start(isolated(scratch / "run", store.resolve(), gpus=gpus))
    try:
        yield run
    finally:
        stop(run.path)
        if logs is not None:
            shutil.copytree(run.log_dir, logs, dirs_exist_ok=True)
            if run.console_log.is_file():
                shutil.copy2(run.console_log, logs / run.console_log.name)


def markdown(env: dict[str, Any], checks: Sequence[ArchiveCheck], loads: Sequence[LoadCheck], times: Sequence[dict[str, Any]]) -> str:
    lines = [f"Measured {env['date']} on {env['gpu'] or 'no GPU'} ({env['device']} workers); {env['machine']}; "
             f"CUDA {env['cuda']}; onnxruntime {env['onnxruntime']}.", "",
             "| archive | format | outcome | runs with (the worker's words) | check | worker GPU MiB | statuses |",
             "|---|---|---|---|---|---|---|"]
    for c in checks:
        mib = "-" if c.gpu_mib is None else f"{c.gpu_mib:.0f}"
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(c.statuses.items()))
        lines.append(f"| {c.name} | {c.format} | **{c.outcome}** | {c.runs_with or '-'} | {c.detail} | {mib} | {statuses} |")
    if loads:
        lines += ["", "| load on | clients x requests | req/s | statuses | wrong answers |", "|---|---|---|---|---|"]
        for ld in loads:
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(ld.statuses.items()))
            lines.append(f"| {ld.name} | {ld.clients} x {ld.requests // ld.clients} | {ld.req_per_s:,.0f} | {statuses} | {ld.wrong} |")
    if times:
        lines += ["", "In-process forward on the device, ms (median of 200):", "", "| archive | engine | batch 1 | batch 64 |", "|---|---|---|---|"]
        for name in dict.fromkeys(t["archive"] for t in times):
            cells = {t["batch"]: t for t in times if t["archive"] == name}
            lines.append(f"| {name} | {cells[1]['engine']} | {cells[1]['ms']:.3f} | {cells[64]['ms']:.3f} |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ts-gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=[d.value for d in DeviceType], default="gpu", help="worker device (default: %(default)s)")
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--models", default="", help="comma-separated archive names (default: every .mar in the store)")
    parser.add_argument("--data", type=Path, action="append", default=[],
                        help="a torch.save'd dict whose x_test rows are the inputs of archives they fit (repeatable; default: seeded random inputs)")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="inputs per archive (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=8, help="clients of each archive's load (0: no load)")
    parser.add_argument("--requests", type=int, default=20, help="requests per client in the load")
    parser.add_argument("--out", type=Path, default=Path("docs/gpu/check"), help="writes OUT.json and OUT.md")
    parser.add_argument("--logs", type=Path, help="copy the server's logs (model_log.log and friends) here when done")
    return parser


def _data(paths: Sequence[Path]) -> list[Inputs]:
    found = []
    for path in paths:
        try:
            x_test = torch.load(path, map_location="cpu", weights_only=True)["x_test"]
            found.append(tuple(t.float() if t.is_floating_point() else t.long() for t in as_inputs(x_test)))
        except (OSError, KeyError, TypeError, RuntimeError) as err:
            raise ScriptError(f"--data {path}: not a torch.save'd dict with x_test ({err})") from None
    return found


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = DeviceType(args.device)
    store = args.model_store.resolve()
    wanted = [m for m in args.models.split(",") if m]
    archives = [store / f"{m}.mar" for m in wanted] if wanted else sorted(p for p in store.glob("*.mar") if p.name.count(".") == 1)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        missing = [a.name for a in archives if not a.is_file()]
        if missing or not archives:
            raise ScriptError(f"not in {store}: {', '.join(missing) or 'any .mar'}; ts-archive build (make mar) first")
        gpus = detect_gpus() if device is DeviceType.GPU else 0
        if device is DeviceType.GPU and gpus == 0:
            raise ScriptError("no GPU here (none visible): run it on a machine with one, or --device cpu")
        data = _data(args.data)
        env = environment(device)
        say(f"ts-gpu-check: {len(archives)} archive(s) on {device.value} workers; {env['gpu'] or 'no GPU'}")
        checks: list[ArchiveCheck] = []
        loads: list[LoadCheck] = []
        times: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp, serving(store, Path(tmp), gpus, args.logs) as run:
            management, api = Management.from_run(run), Inference.from_run(run)
            for i, archive in enumerate(archives, 1):
                check, bodies, expected = check_archive(management, api, archive, device, data, args.rows, Path(tmp))
                checks.append(check)
                say(f"[{i}/{len(archives)}] {check.name}: {check.outcome}; {check.detail}; {check.runs_with}")
                if check.outcome == "served" and args.clients > 0:
                    management.register(archive.name, name=check.name, device=device)
                    try:
                        bound = check.measure.get("tolerance", FP32_TOLERANCE)
                        loads.append(load(api, check.name, bodies[0], expected[0], bound, args.clients, args.requests))
                    finally:
                        management.unregister(check.name)
                    say(f"  load: {loads[-1].req_per_s:,.0f} req/s, statuses {loads[-1].statuses}, wrong {loads[-1].wrong}")
                if check.outcome == "served":
                    times += timings(archive, torch.device("cuda:0" if device is DeviceType.GPU else "cpu"), Path(tmp))
    except ServereadyError as err:
        print(f"ts-gpu-check: error: {err.message}", file=sys.stderr)
        return err.exit_code
    report = {"environment": env, "archives": [asdict(c) for c in checks],
              "loads": [{**asdict(ld), "req_per_s": ld.req_per_s} for ld in loads], "in_process": times}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v) + "\n")
    text = markdown(env, checks, loads, times)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    errors = sum(v for c in checks for k, v in c.statuses.items() if k.startswith("5")) + sum(
        v for ld in loads for k, v in ld.statuses.items() if k.startswith("5"))
    bad = [c.name for c in checks if c.outcome == "failed"] + [ld.name for ld in loads if ld.wrong]
    if bad or errors:
        say(f"ts-gpu-check: {len(bad)} failed ({', '.join(bad)}), {errors} 5xx answer(s)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
