"""ts-gpu-check: every archive of a model store on GPU workers of a real TorchServe, checked against the CPU.

    ts-gpu-check                        # model_store/*.mar on GPU workers; docs/gpu/check.{json,md}
    ts-gpu-check --device cpu --out /tmp/cpu-check   # the same run on CPU workers (machines without a GPU)

For each archive: register it (1 worker) on the device, read back what the worker says it runs
with, send it predictions and compare them with the archive's own model loaded here on the CPU
(net: outputs within 1e-3, or a few units in the last place for half precision; digits: the
labels of 300 held-out images), note the worker's GPU memory, and unregister it. Then a short load on the
digits family: 32 clients x 60 requests, every answer checked, and the served req/s.
In-process, digits at batch 1 and 64 in fp32, fp16 and bf16 on the device.

Exit status 0 when every archive served right (or was refused with its reason) and no answer
was a 5xx.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch

from serveready.archiver.build import load_archive
from serveready.archiver.datasets import load_digits_split
from serveready.handlers.config import DeviceType
from serveready.handlers.loaders import Loaded
from serveready.handlers.runtime import machine

from .client import Inference, Management, archive_config
from .runinfo import RunDir, ScriptError
from .server import detect_gpus, isolated, start, stop

DIGITS_IMAGES = 300
NET_ROWS = 64
#: outputs on the device against the same archive on the CPU: 1e-3, or for half precision
#: this many units in the last place of the largest output
FP32_TOLERANCE = 1e-3
HALF_ULPS = 8
#: digits labels that must agree with the same archive on the CPU
MIN_AGREEMENT = 0.98
DTYPE_ARCHIVES = ("digits", "digits_fp16", "digits_bf16")


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


# -- references on this machine's CPU -----------------------------------------------

@dataclass(frozen=True)
class Probe:
    """A request body and how to score the answers to it."""

    body: bytes
    content_type: str


def net_rows() -> np.ndarray:
    return np.random.default_rng(11).normal(size=(NET_ROWS, 10)).astype(np.float32)


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    split = load_digits_split(0, 0.2)
    return split.x_test[:DIGITS_IMAGES].numpy(), split.y_test[:DIGITS_IMAGES].numpy()


def cpu_outputs(archive: Path, inputs: np.ndarray) -> np.ndarray:
    """The archive's model loaded here on the CPU, as a worker loads it."""
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        return load_archive(archive, Path(tmp)).run(torch.from_numpy(inputs)).float().numpy()


def _status(reply: requests.Response) -> str:
    return str(reply.status_code)


def _count(statuses: dict[str, int], status: str) -> None:
    statuses[status] = statuses.get(status, 0) + 1


def tolerance(config: dict[str, Any], outputs: np.ndarray) -> float:
    """How far the device may be from the CPU for this archive: its dtype's rounding, at the outputs' scale."""
    model = config.get("model") or {}
    if model.get("format") != "half":
        return FP32_TOLERANCE
    eps = torch.finfo(getattr(torch, model.get("dtype") or "float16")).eps
    return max(FP32_TOLERANCE, HALF_ULPS * eps * float(np.abs(outputs).max()))


def check_net(api: Inference, name: str, archive: Path, fp32: Path, check: ArchiveCheck) -> None:
    rows = net_rows()
    reply = api.post(name, json.dumps({"inputs": rows.tolist()}).encode(), "application/json")
    _count(check.statuses, _status(reply))
    if reply.status_code != 200:
        check.detail = f"HTTP {reply.status_code}: {reply.text[:300]}"
        return
    served = np.array(reply.json()["predictions"], dtype=np.float64)
    on_cpu = cpu_outputs(archive, rows)
    versus_self = float(np.abs(served - on_cpu).max())
    versus_fp32 = float(np.abs(served - cpu_outputs(fp32, rows)).max()) if fp32.is_file() else float("nan")
    bound = tolerance(archive_config(archive), on_cpu)
    check.measure = {"max_abs_diff_vs_same_archive_cpu": versus_self, "tolerance": bound, "max_abs_diff_vs_fp32_cpu": versus_fp32}
    check.outcome = "served" if versus_self <= bound else "failed"
    check.detail = (f"{NET_ROWS} rows: max |served - this archive on CPU| {versus_self:.2e} (tolerance {bound:.1e}); "
                    f"vs fp32 on CPU {versus_fp32:.2e}")


def check_digits(api: Inference, name: str, archive: Path, png: bytes, check: ArchiveCheck) -> None:
    images, labels = digits_images()
    expected = cpu_outputs(archive, images).argmax(axis=1)
    got = []
    for ink in images:
        reply = api.post(name, json.dumps({"inputs": (ink[0] * 16).tolist(), "k": 1}).encode(), "application/json")
        _count(check.statuses, _status(reply))
        got.append(reply.json()["predictions"][0]["index"] if reply.status_code == 200 else -1)
    picture = api.post(name, png, "image/png")
    _count(check.statuses, _status(picture))
    agreement = float((np.array(got) == expected).mean())
    accuracy = float((np.array(got) == labels).mean())
    check.measure = {"accuracy": accuracy, "agreement_with_cpu": agreement}
    check.outcome = "served" if agreement >= MIN_AGREEMENT and picture.status_code == 200 else "failed"
    check.detail = f"{DIGITS_IMAGES} digits: accuracy {accuracy:.3f}, same label as on the CPU {agreement:.3f}; PNG body HTTP {picture.status_code}"


def load(api: Inference, name: str, png: bytes, label: int, clients: int, per_client: int) -> LoadCheck:
    """``clients`` threads each sending ``per_client`` PNG requests; every answer checked."""
    statuses: dict[str, int] = {}
    wrong = 0

    def client(_: int) -> list[tuple[str, bool]]:
        with requests.Session() as session:
            seen = []
            for _ in range(per_client):
                reply = session.post(f"{api.url}/predictions/{name}", data=png, headers=api.headers("image/png"), timeout=api.timeout)
                right = reply.status_code == 200 and reply.json()["predictions"][0]["index"] == label
                seen.append((_status(reply), right))
            return seen

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [item for chunk in pool.map(client, range(clients)) for item in chunk]
    seconds = time.perf_counter() - began
    for status, right in results:
        _count(statuses, status)
        wrong += not right
    return LoadCheck(name, clients, len(results), seconds, statuses, wrong)


# -- in-process dtypes ----------------------------------------------------------------

def dtype_timings(store: Path, device: torch.device, batches: Sequence[int] = (1, 64), repeats: int = 200) -> list[dict[str, Any]]:
    """Milliseconds per forward of digits in fp32/fp16/bf16 on ``device`` (median of ``repeats``)."""
    rows = []
    for name in DTYPE_ARCHIVES:
        archive = store / f"{name}.mar"
        if not archive.is_file():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            loaded = load_archive(archive, Path(tmp), device)
            for batch in batches:
                ms = _time(_as_served(loaded), torch.rand((batch, 1, 8, 8)), device, repeats)
                rows.append({"archive": name, "batch": batch, "ms": ms, "engine": loaded.engine})
    return rows


def _as_served(loaded: Loaded) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward as the handler runs it: copy in, compute, copy out."""
    return lambda inputs: loaded.run(inputs.to(loaded.inputs_on)).float().cpu()


def _time(run: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, device: torch.device, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
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


def check_archive(management: Management, api: Inference, archive: Path, device: DeviceType, png: bytes) -> ArchiveCheck:
    name = archive.name.removesuffix(".mar")
    config = archive_config(archive)
    check = ArchiveCheck(name, (config.get("model") or {}).get("format", "eager"))
    try:
        registration = management.register(archive.name, name=name, workers=1, device=device)
    except ScriptError as err:
        check.outcome, check.detail = "refused", err.message
        return check
    check.runs_with = registration.runs_with
    try:
        entry = config.get("handler") or {}
        if "input_width" in entry:
            check_net(api, name, archive, archive.with_name(f"{name.split('_')[0]}.mar"), check)
        else:
            check_digits(api, name, archive, png, check)
        pids = [w.get("pid") for w in management.describe(name)[0].get("workers", [])]
        memory = gpu_memory_mib()
        if memory:
            check.gpu_mib = sum(memory.get(int(pid), 0.0) for pid in pids if pid)
    finally:
        management.unregister(name)
    return check


def markdown(env: dict[str, Any], checks: Sequence[ArchiveCheck], loads: Sequence[LoadCheck], timings: Sequence[dict[str, Any]]) -> str:
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
    if timings:
        lines += ["", "In-process forward, ms (median of 200):", "", "| archive | engine | batch 1 | batch 64 |", "|---|---|---|---|"]
        for name in DTYPE_ARCHIVES:
            cells = {t["batch"]: t for t in timings if t["archive"] == name}
            if cells:
                engine = next(iter(cells.values()))["engine"]
                lines.append(f"| {name} | {engine} | {cells[1]['ms']:.3f} | {cells[64]['ms']:.3f} |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ts-gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=[d.value for d in DeviceType], default="gpu", help="worker device (default: %(default)s)")
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--models", default="", help="comma-separated archive names (default: every .mar in the store)")
    parser.add_argument("--image", type=Path, default=Path("docs/images/digit.png"), help="the PNG body for digits")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=60, help="per client, in the load")
    parser.add_argument("--out", type=Path, default=Path("docs/gpu/check"), help="writes OUT.json and OUT.md")
    parser.add_argument("--logs", type=Path, help="copy the server's logs (model_log.log and friends) here when done")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = DeviceType(args.device)
    store = args.model_store.resolve()
    wanted = [m for m in args.models.split(",") if m]
    archives = [store / f"{m}.mar" for m in wanted] if wanted else sorted(store.glob("*.mar"))
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        missing = [a.name for a in archives if not a.is_file()]
        if missing or not archives:
            raise ScriptError(f"not in {store}: {', '.join(missing) or 'any .mar'}; make mar")
        gpus = detect_gpus() if device is DeviceType.GPU else 0
        if device is DeviceType.GPU and gpus == 0:
            raise ScriptError("no GPU here (torch sees none): run it on a machine with one, or --device cpu")
        env = environment(device)
        png = args.image.read_bytes()
        say(f"ts-gpu-check: {len(archives)} archive(s) on {device.value} workers; {env['gpu'] or 'no GPU'}")
        timings = dtype_timings(store, torch.device("cuda:0" if device is DeviceType.GPU else "cpu"))
        checks: list[ArchiveCheck] = []
        loads: list[LoadCheck] = []
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp, serving(store, Path(tmp), gpus, args.logs) as run:
            management, api = Management.from_run(run), Inference.from_run(run)
            for i, archive in enumerate(archives, 1):
                check = check_archive(management, api, archive, device, png)
                checks.append(check)
                say(f"[{i}/{len(archives)}] {check.name}: {check.outcome}; {check.detail}; {check.runs_with}")
            for name in [n for n in DTYPE_ARCHIVES if (store / f"{n}.mar") in archives]:
                management.register(f"{name}.mar", name=name, device=device)
                expected = json.loads(api.post(name, png, "image/png").content)["predictions"][0]["index"]
                loads.append(load(api, name, png, expected, args.clients, args.requests))
                management.unregister(name)
                say(f"load on {name}: {loads[-1].req_per_s:,.0f} req/s, statuses {loads[-1].statuses}, wrong {loads[-1].wrong}")
    except ScriptError as err:
        print(f"ts-gpu-check: error: {err.message}", file=sys.stderr)
        return 1
    report = {"environment": env, "archives": [asdict(c) for c in checks],
              "loads": [{**asdict(ld), "req_per_s": ld.req_per_s} for ld in loads], "in_process": timings}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(env, checks, loads, timings)
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
