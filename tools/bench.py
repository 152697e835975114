"""Side-by-side HTTP benchmark (``make bench``, ``python -m tools.bench``): this project against stock set-ups.

One run, on the same weights, with ``wrk`` as the closed-loop client:

- ``project``: the archive from the model store, as shipped (its tuned ``serve:``), on a
  TorchServe that ``ts-server start`` configures;
- ``project-1ms``: the same archive and server, 2 workers, batch 16, 1 ms (what the tuner
  picks when a lone client may wait for a batch);
- ``stock-b1``: a TorchServe-example-style handler (``BaseHandler``), 2 workers, batch 1,
  on a TorchServe with its default config (logging, metrics in log mode);
- ``plain``: the project's archive on that same stock TorchServe, registered by a plain register
  call as a user of stock TorchServe would (the archive's own 2 workers, batch 1): the handler
  against the stock one, on the same server;
- ``stock-tuned``: the same handler hand-tuned: 2 workers, batch 8, 5 ms, 1 torch thread;
- ``litserve``: LitServe (``pip install 'serveready[bench]'``), 2 workers, 2 API servers.

Every system gets a warm-up (the Java frontend gets 2-3x faster over its first ~30 s),
then levels and systems are interleaved and repeated (the order rotates each repeat), so
drift hits all systems alike; the lone client's cells get more repeats (``--lone-repeats``). Each
cell records req/s, p50/p90/p99, errors, the server's CPU per request (its whole process tree) and
the client's own CPU; a table gives medians over the repeats.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import requests

from serveready.archiver.tune import concurrency_axes
from serveready.handlers.archive import Archive
from serveready.handlers.runtime import machine
from serveready.scripts.client import Management
from serveready.scripts.loadgen import Load, LoadResult, drain, run_wrk, wrk_path
from serveready.scripts.runinfo import RunDir, ScriptError, TokenKind
from serveready.scripts.server import _pid, free_ports, isolated, start, stop

from . import bench_hosts
from .profile import profile_archive, profile_table

BASELINES = Path(__file__).with_name("baselines")
T = TypeVar("T")
SYSTEMS = ("project", "project-1ms", "plain", "stock-b1", "stock-tuned", "litserve", "kserve", "ray")
#: project-1ms: the same archive and server with the setting ts-archive tune picks when a lone
#: client may wait (--lone-slowdown 0): full batches, each waiting up to 1 ms to fill.
THROUGHPUT_SETTING = {"workers": 2, "batch_size": 16, "max_batch_delay": 1}
ROW = {"inputs": [0.1, -0.2, 0.3, 0.0, 1.5, -1.0, 0.7, 0.2, -0.4, 0.9]}


@dataclass(frozen=True)
class Workload:
    """One model as every system serves it."""

    model: str           # the archive name in the model store
    kind: str            # "tabular", "digits", "text" or "audio": which stock handler and LitServe decoder
    model_file: Path
    class_name: str
    weights: Path
    body: bytes          # what wrk sends to TorchServe
    content_type: str
    litserve_body: bytes  # LitServe decodes JSON only
    extra_files: tuple[Path, ...] = ()  # what the stock handler reads beside the weights (a tokenizer)
    configs: Path | None = None  # a model outside the repository's model_configs/: built into its own store on first use
    stock_model_file: Path | None = None  # what the stock archive names as its model file, when not model_file
    #: at least this long a cell: a model of ~40 ms on 2 cores completes ~25 requests a second, and a 4 s cell at 64
    #: clients would hold two rounds of them
    min_seconds: float = 0.0

    def store(self, default: Path) -> Path:
        """Where its archive is: the model store, or its example's own (``examples/NAME/model_store``)."""
        return default if self.configs is None else self.configs.parent / "model_store"


@dataclass
class System:
    """A running server and how to reach the model on it."""

    name: str
    url: str
    token: str | None
    pids: Sequence[int]   # process trees whose CPU counts as the server's
    body: bytes
    content_type: str
    host: str = ""        # the server process it shares with others (one cold start, one memory figure per host)

    def processes(self) -> list[psutil.Process]:
        """Every process of the trees, once."""
        found: dict[int, psutil.Process] = {}
        for pid in self.pids:
            found.update({p.pid: p for p in bench_hosts.tree(pid)})
        return list(found.values())

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds its processes have used, by role (:func:`role`)."""
        total: dict[str, float] = {}
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                name = role(proc.cmdline())
                total[name] = total.get(name, 0.0) + times.user + times.system
        return total

    def memory(self) -> tuple[float, int]:
        """Resident MiB of the server's processes, and how many there are."""
        total, count = 0.0, 0
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss / 2**20
                count += 1
        return total, count


#: what a server process does, by a piece of its command line (first match); the rest is "server"
ROLES = (("ray::ProxyActor", "Serve's HTTP proxy"), ("Ingress", "ingress replica"), ("ray::ServeReplica", "model replicas"),
         ("/ray/", "Ray's own processes"), ("ray::", "Ray's own processes"), ("model_service_worker", "Python workers"))


def role(cmdline: Sequence[str]) -> str:
    """The part a process plays in its server: where the server CPU per request goes (Ray: proxy, ingress, replica, Ray itself)."""
    if cmdline and Path(cmdline[0]).name == "java":
        return "Java frontend"
    line = " ".join(cmdline)
    return next((name for piece, name in ROLES if piece in line), "server")


@dataclass(frozen=True)
class Cell:
    """One measurement of one system at one level in one repeat."""

    system: str
    repeat: int
    result: LoadResult
    server_cpu_us: float  # server CPU per request, microseconds
    roles_us: dict[str, float] = dataclasses.field(default_factory=dict)  # the same, by the role of the process


STOCK_HANDLERS = {"tabular": "stock_tabular.py", "digits": "stock_digits.py", "text": "stock_text.py", "audio": "stock_audio.py",
                  "image": "stock_image.py"}
RESNET = Path("examples/resnet18")


def photo() -> bytes:
    """A real photograph that ships offline: scikit-learn's sample ``china.jpg`` (640x427 JPEG)."""
    import importlib.resources

    return (importlib.resources.files("sklearn.datasets") / "images" / "china.jpg").read_bytes()


def workloads(image: Path, review: Path = Path("docs/review.txt"), clip: Path = Path("docs/seven.wav")) -> dict[str, Workload]:
    """The four examples, each with the body its README curl line sends (the text as JSON, for LitServe too)."""
    png = image.read_bytes()
    jpeg = photo()
    text = json.dumps({"text": review.read_text().strip()}).encode() if review.is_file() else b""
    wav = clip.read_bytes() if clip.is_file() else b""
    return {
        "net": Workload("net", "tabular", Path("examples/net/models/net.py"), "Net", Path("examples/net/artifacts/net.pt"),
                        json.dumps(ROW).encode(), "application/json", json.dumps(ROW).encode()),
        "digits": Workload("digits", "digits", Path("examples/digits/models/digits.py"), "DigitsCNN", Path("examples/digits/artifacts/digits.pt"),
                           png, "image/png", json.dumps({"image": base64.b64encode(png).decode()}).encode()),
        "sentiment": Workload("sentiment", "text", Path("examples/sentiment/models/sentiment.py"), "SentimentBag",
                              Path("examples/sentiment/artifacts/sentiment.pt"), text, "application/json", text,
                              (Path("examples/sentiment/artifacts/sentiment_tokenizer.json"),)),
        "spoken_digits": Workload("spoken_digits", "audio", Path("examples/spoken_digits/models/spoken_digits.py"), "SpokenDigitNet",
                                  Path("examples/spoken_digits/artifacts/spoken_digits.pt"), wav, "audio/wav",
                                  json.dumps({"audio": base64.b64encode(wav).decode()}).encode()),
        "resnet18": Workload("resnet18", "image", RESNET / "models/resnet18.py", "ResNet18", RESNET / "artifacts/resnet18.pt", jpeg, "image/jpeg",
                             json.dumps({"image": base64.b64encode(jpeg).decode()}).encode(), configs=RESNET / "model_configs",
                             stock_model_file=BASELINES / "stock_resnet18_model.py", min_seconds=10.0),
    }


def ensure_archive(work: Workload, default_store: Path, progress) -> Path:
    """The workload's archive; a model of its own example folder is trained and built there when stale (a progress line each)."""
    store = work.store(default_store)
    if work.configs is not None:
        tool = str(Path(sys.executable).with_name("ts-archive"))
        progress(f"{work.model}: ts-archive train and build --if-stale in {work.configs.parent} (seeded weights, the archive)")
        for step in (["train", "--if-stale", work.model], ["build", "--if-stale", "--store", str(store), work.model]):
            subprocess.run([tool, "--configs", str(work.configs), *step], check=True, cwd=Path.cwd())
    archive = store / f"{work.model}.mar"
    if not archive.is_file():
        raise ScriptError(f"{archive} does not exist: make mar")
    return archive


# -- the systems ----------------------------------------------------------------

def stock_archive(work: Workload, name: str, store: Path, serve: dict, torch_threads: int | None) -> Path:
    """A stock-style archive made with torch-model-archiver, as TorchServe's examples make one."""
    with tempfile.TemporaryDirectory() as tmp:
        config = dict(serve)
        if torch_threads:
            config["handler"] = {"torch_threads": torch_threads}
        config_file = Path(tmp, "model-config.yaml")
        config_file.write_text(json.dumps(config))  # JSON is YAML
        handler = BASELINES / STOCK_HANDLERS[work.kind]
        archiver = Path(sys.executable).with_name("torch-model-archiver")
        extras = [*work.extra_files, *([work.model_file] if work.stock_model_file else [])]
        extra = ["--extra-files", ",".join(str(p) for p in extras)] if extras else []
        subprocess.run([str(archiver), "--model-name", name, "--version", "1.0", "--model-file", str(work.stock_model_file or work.model_file),
                        "--serialized-file", str(work.weights), "--handler", str(handler), "--config-file", str(config_file),
                        "--export-path", str(store), "--force", *extra], check=True, capture_output=True)
    return store / f"{name}.mar"


def start_litserve(work: Workload, log: Path, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    [port] = free_ports(1)
    command = [sys.executable, "-m", "tools.baselines.litserve_app", "--kind", work.kind, "--model-file", str(work.model_file),
               "--class", work.class_name, "--weights", str(work.weights), "--port", str(port)]
    command += [a for path in work.extra_files for a in ("--extra-file", str(path))]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ScriptError(f"LitServe exited ({proc.returncode}); see {log}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/predict"
        time.sleep(0.5)
    stop_tree(proc.pid)
    raise ScriptError(f"LitServe did not answer /health within {timeout:.0f}s; see {log}")


def stop_tree(pid: int) -> None:
    bench_hosts.stop_processes(bench_hosts.tree(pid))


@contextlib.contextmanager
def running_systems(work: Workload, names: Sequence[str], store: Path, scratch: Path, progress,
                    cold: dict[str, float] | None = None) -> Iterator[list[System]]:
    """Start what ``names`` need (two TorchServes, LitServe, KServe's server, a Ray), register the models; stop all
    afterwards. ``cold`` gets each host's cold start: seconds from starting its process to its first answer."""
    systems: list[System] = []
    runs: list[Path] = []
    litserve: subprocess.Popen | None = None
    others: list[Callable[[], None]] = []
    cold = {} if cold is None else cold

    def first_answer(system: System, began: float) -> System:
        answer_of(system)
        cold.setdefault(system.host, time.monotonic() - began)
        return system

    try:
        if "project" in names:
            progress(f"{work.model}: starting the project's TorchServe (ts-server configuration)")
            began = time.monotonic()
            run = start(isolated(scratch / "project", store))
            runs.append(run.path)
            Management.from_run(run).register(f"{work.model}.mar")  # workers and batching: the archive's own
            systems.append(first_answer(_ts_system("project", run, work.model, work), began))
        if "project-1ms" in names:
            if not runs:
                run = start(isolated(scratch / "project", store))
                runs.append(run.path)
            Management.from_run(run).register(f"{work.model}.mar", name=f"{work.model}_1ms", **THROUGHPUT_SETTING)
            systems.append(_ts_system("project-1ms", run, f"{work.model}_1ms", work))  # its host's cold start is project's
        stock = [n for n in names if n.startswith("stock-") or n == "plain"]
        if stock:
            progress(f"{work.model}: starting a stock TorchServe (default logging and metrics) for {', '.join(stock)}")
            stock_store = scratch / "stock_store"
            stock_store.mkdir(exist_ok=True)
            if "stock-b1" in stock:
                stock_archive(work, f"{work.model}_stock_b1", stock_store, {"minWorkers": 2, "maxWorkers": 2, "batchSize": 1}, None)
            if "stock-tuned" in stock:
                stock_archive(work, f"{work.model}_stock_tuned", stock_store,
                              {"minWorkers": 2, "maxWorkers": 2, "batchSize": 8, "maxBatchDelay": 5}, 1)
            if "plain" in stock:
                shutil.copy2(store / f"{work.model}.mar", stock_store / f"{work.model}_plain.mar")
            config = dataclasses.replace(isolated(scratch / "stock", stock_store), metrics_mode="log", log_config=None, job_queue_size=100,
                                         batching="stock")
            began = time.monotonic()
            run = start(config)
            runs.append(run.path)
            management = Management.from_run(run)
            for name in stock:
                # Registered as a stock user would (curl): ts-manage refuses archives without SHA256SUMS,
                # and would pass the archive's register: section, which a plain register call does not.
                model = f"{work.model}_{name.replace('-', '_')}"
                workers = Archive(stock_store / f"{model}.mar").workers[0] if name == "plain" else 2  # plain: the archive's own
                management.call("POST", "/models", url=f"{model}.mar", model_name=model, initial_workers=workers, synchronous="true")
                management.wait_ready(model, workers, timeout=120.0)
                systems.append(first_answer(_ts_system(name, run, model, work, "stock TorchServe"), began))
        if "litserve" in names:
            progress(f"{work.model}: starting LitServe")
            began = time.monotonic()
            litserve, url = start_litserve(work, scratch / f"litserve_{work.model}.log")
            systems.append(first_answer(System("litserve", url, None, [litserve.pid], work.litserve_body, "application/json", "LitServe"), began))
        if "kserve" in names:
            progress(f"{work.model}: starting KServe's model server (python -m serveready.kserve --workers 2)")
            began = time.monotonic()
            kserve, url = bench_hosts.start_kserve(work.model, store, scratch / f"kserve_{work.model}.log")
            others.append(lambda: stop_tree(kserve.pid))
            systems.append(first_answer(System("kserve", url, None, [kserve.pid], work.body, work.content_type, "KServe"), began))
        if "ray" in names:
            progress(f"{work.model}: starting Ray Serve (serve run of ts-archive ray's config, 2 replicas of 1 CPU)")
            (scratch / "ray").mkdir()
            began = time.monotonic()
            ray, url, temp = bench_hosts.start_ray(work.model, store, scratch / "ray", scratch / f"ray_{work.model}.log")
            others.append(lambda: bench_hosts.stop_ray(ray, temp))
            pids = [ray.pid, *(p.pid for p in bench_hosts.ray_processes(temp))]
            systems.append(first_answer(System("ray", url, None, pids, work.body, work.content_type, "Ray Serve"), began))
        yield systems
    finally:
        for path in runs:
            stop(path)
        if litserve is not None:
            stop_tree(litserve.pid)
        for stop_other in others:
            stop_other()


def _ts_system(name: str, run: RunDir, model: str, work: Workload, host: str = "TorchServe (ts-server)") -> System:
    pid = _pid(run)
    return System(name, f"{run.inference_url}/predictions/{model}", run.token(TokenKind.INFERENCE), [pid] if pid else [], work.body, work.content_type, host)


# -- measuring --------------------------------------------------------------------

def measure(system: System, level: int, seconds: float, scratch: Path, repeat: int) -> Cell:
    body = scratch / f"{system.name}.body"
    if not body.exists():
        body.write_bytes(system.body)
    load = Load(system.url, body, system.content_type, system.token)
    before = system.cpu_seconds()
    result = run_wrk(load, level, seconds, settle=False)
    after = system.cpu_seconds()  # before the backlog wrk leaves is worked off: that CPU would buy no counted answer
    drain(load)
    per_request = {name: (after[name] - before.get(name, 0.0)) / max(result.requests, 1) * 1e6 for name in after}
    return Cell(system.name, repeat, result, sum(per_request.values()), per_request)


@contextlib.contextmanager
def alone(system: System, systems: Sequence[System], freeze: bool = True) -> Iterator[None]:
    """``system`` alone on the machine: every other system's processes stopped (SIGSTOP) until it is measured.

    On 2 cores an idle Ray alone takes ~13% of a core (24 processes' heartbeats and metrics), and a server that
    still computes the last cell's backlog takes more: a neighbour's load would be charged to whoever is measured.
    Processes it shares with ``system`` (two models on one TorchServe) keep running."""
    mine = {p.pid for p in system.processes()}
    stopped: list[psutil.Process] = []
    try:
        for other in systems if freeze else ():
            for proc in other.processes():
                if proc.pid not in mine:
                    with contextlib.suppress(psutil.Error):
                        proc.suspend()
                        stopped.append(proc)
                        mine.add(proc.pid)
        yield
    finally:
        for proc in stopped:
            with contextlib.suppress(psutil.Error):
                proc.resume()


def answer_of(system: System) -> str:
    """What ``system`` answers the workload's body, reduced to what every system must agree on (the top class, or the
    values to 4 decimals): systems that compute different things are not compared (a stock decoder may differ in the
    last digits of a probability, not in the class)."""
    headers = {"Content-Type": system.content_type, **({"Authorization": f"Bearer {system.token}"} if system.token else {})}
    reply = requests.post(system.url, data=system.body, headers=headers, timeout=120)
    if reply.status_code != 200:
        raise ScriptError(f"{system.name} answered the benchmark's body with HTTP {reply.status_code}: {reply.text[:300]}")
    first = reply.json()["predictions"][0]
    if isinstance(first, dict):
        return f"class {first['class']}"
    return "values " + ", ".join(f"{v:.4f}" for v in first)


def schedule(systems: Sequence[T], levels: Sequence[int], repeats: int, lone_repeats: int = 0) -> list[tuple[int, int, T]]:
    """The cells in the order they are measured: (repeat, level, system).

    Every level ``repeats`` times, levels and systems interleaved and the systems' order rotating each repeat,
    so drift hits all systems alike; then the lone-client level (1 client) alone until it has ``lone_repeats``.
    A lone client of a ~40 ms model completes ~250 requests in 10 s: its p50 follows the machine's phase
    (``resnet18``'s varied 34-88 ms across repeats of one system), and a median of more repeats is the servers'."""
    plan = []
    for repeat in range(max(repeats, lone_repeats)):
        order = list(systems[repeat % len(systems):]) + list(systems[:repeat % len(systems)])
        for level in levels if repeat < repeats else [level for level in levels if level == 1]:
            plan += [(repeat, level, system) for system in order]
    return plan


def bench(work: Workload, names: Sequence[str], levels: Sequence[int], seconds: float, repeats: int, warmup: float,
          store: Path, progress, freeze: bool = True, settle: float = 1.0,
          lone_repeats: int = 0) -> tuple[dict[tuple[str, int], list[Cell]], str, dict[str, dict[str, float]]]:
    """Check that every system gives the same answer, warm them up, then measure the cells of :func:`schedule`,
    each :func:`alone` (unless ``freeze`` is off) after ``settle`` seconds of the same load unmeasured (a server
    just continued, or just done with another level, is not yet at its pace).
    Returns the cells, the answer, and per host its cold start and (after the warm-up) its resident memory and
    processes."""
    seconds = max(seconds, work.min_seconds)
    cells: dict[tuple[str, int], list[Cell]] = {}
    cold: dict[str, float] = {}
    hosts: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ts-bench-") as tmp, running_systems(work, names, store, Path(tmp), progress, cold) as systems:
        answers = {system.name: answer_of(system) for system in systems}
        if len(set(answers.values())) > 1:
            raise ScriptError(f"{work.model}: the systems answer differently: " + "; ".join(f"{k}: {v}" for k, v in answers.items()))
        progress(f"{work.model}: every system answers {next(iter(answers.values()))}")
        for system in systems:
            progress(f"{work.model}: warming {system.name} up for {warmup:.0f}s")
            with alone(system, systems, freeze):
                measure(system, max(levels), warmup, Path(tmp), -1)
        for system in systems:
            if system.host and system.host not in hosts:
                rss, count = system.memory()
                hosts[system.host] = {"cold_start_s": round(cold.get(system.host, float("nan")), 2), "rss_mib": round(rss), "processes": count}
                progress(f"{work.model}: {system.host}: cold start {hosts[system.host]['cold_start_s']:.1f} s, {rss:,.0f} MiB in {count} processes")
        plan = schedule(systems, levels, repeats, lone_repeats)
        for done, (repeat, level, system) in enumerate(plan, 1):
            with alone(system, systems, freeze):
                if settle > 0:
                    measure(system, level, settle, Path(tmp), -1)
                cell = measure(system, level, seconds, Path(tmp), repeat)
            cells.setdefault((system.name, level), []).append(cell)
            r = cell.result
            progress(f"[{done}/{len(plan)}] {work.model} {system.name:12s} c={level:<3d} {r.rps:8,.0f} req/s  p50 {r.p50_ms:6.2f}  "
                     f"p99 {r.p99_ms:7.2f} ms  errors {r.errors}  server {cell.server_cpu_us:5.0f} us/req  wrk {r.client_cpu_s / r.seconds:.2f} core")
    return cells, next(iter(answers.values()), ""), hosts


# -- summarising --------------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    """A system at a level, over the repeats: medians (one slow phase of the machine does not move them), the
    range of req/s, and the mean server CPU."""

    rps: float
    rps_low: float
    rps_high: float
    p50: float
    p90: float
    p99: float
    errors: int
    server_cpu_us: float
    client_core: float
    roles_us: dict[str, float] = dataclasses.field(default_factory=dict)


def summarise(cells: Sequence[Cell]) -> Summary:
    rs = [c.result for c in cells]
    roles = sorted({name for c in cells for name in c.roles_us})
    return Summary(
        rps=statistics.median(r.rps for r in rs), rps_low=min(r.rps for r in rs), rps_high=max(r.rps for r in rs),
        p50=statistics.median(r.p50_ms for r in rs), p90=statistics.median(r.p90_ms for r in rs), p99=statistics.median(r.p99_ms for r in rs),
        errors=sum(r.errors for r in rs), server_cpu_us=statistics.mean(c.server_cpu_us for c in cells),
        client_core=max(r.client_cpu_s / r.seconds for r in rs),
        roles_us={name: statistics.mean(c.roles_us.get(name, 0.0) for c in cells) for name in roles},
    )


def roles_table(table: dict[tuple[str, int], Summary], names: Sequence[str], levels: Sequence[int]) -> list[str]:
    """Where each server's CPU per request goes, by the role of the process (systems with more than one role)."""
    rows = []
    for name in names:
        for level in levels:
            s = table.get((name, level))
            if s is not None and len(s.roles_us) > 1:
                parts = ", ".join(f"{role} {us:,.0f}" for role, us in sorted(s.roles_us.items(), key=lambda kv: -kv[1]) if us >= 0.5)
                rows.append(f"| {name} | {level} | {s.server_cpu_us:,.0f} | {parts} |")
    if not rows:
        return []
    return ["", "Where the server CPU goes (µs per request, by process):", "",
            "| system | clients | total | by process |", "|---|---:|---:|---|", *rows]


@dataclass(frozen=True)
class Targets:
    """Issue 20's targets for one model: ratios within one run (``None``: reported, not judged)."""

    lone_rps: float | None = 0.9   # c=1 throughput: at least this times stock-b1's
    lone_p50: float = 1.2          # c=1 p50: at most this times the lowest stock p50 there
    #: throughput against the best stock set-up: (from this many clients on, at least this times)
    crowd: tuple[tuple[int, float], ...] = ((8, 1.1), (32, 1.5))
    crowd_p99: float | None = 1.1  # from 32 clients on: p99 at most this times the best stock p99
    litserve: float | None = 3.0   # throughput under load against LitServe's
    #: the archive on a plain TorchServe against the stock handler's req/s: (clients, at least this times)
    plain: tuple[tuple[int, float], ...] = ((1, 1.0), (8, 1.1), (32, 1.1))

    def crowd_ratio(self, level: int) -> float | None:
        found = [ratio for since, ratio in self.crowd if level >= since]
        return found[-1] if found else None


#: the compute-bound model: >= 1.1x the best stock set-up at 8-64 clients, a lone client's p50 within 1.1x
TARGETS = {"resnet18": Targets(lone_rps=None, lone_p50=1.1, crowd=((8, 1.1),), crowd_p99=None, litserve=None, plain=())}


def verdicts(table: dict[tuple[str, int], Summary], levels: Sequence[int], system: str = "project", targets: Targets = Targets()) -> list[str]:
    """The issue's targets for ``system``, each with its ratio and whether this run met it."""
    out = []

    def line(ok: bool | None, text: str) -> None:
        out.append(f"- {'(reported)' if ok is None else 'met:' if ok else '**missed**:'} {text}")

    for level in levels:
        p = table.get((system, level))
        b1, tuned, lit = (table.get((n, level)) for n in ("stock-b1", "stock-tuned", "litserve"))
        if p is None:
            continue
        stock = {n: s for n, s in (("stock-b1", b1), ("stock-tuned", tuned)) if s is not None}
        if level == 1 and stock:
            if b1 is not None:
                want = targets.lone_rps
                line(None if want is None else p.rps >= want * b1.rps,
                     f"c=1 throughput {p.rps / b1.rps:.2f}x stock-b1" + ("" if want is None else f" (target >= {want:g}x)"))
            lowest = min(stock, key=lambda n: stock[n].p50)
            line(p.p50 <= targets.lone_p50 * stock[lowest].p50,
                 f"c=1 p50 {p.p50 / stock[lowest].p50:.2f}x the lowest stock p50 ({lowest}'s; target <= {targets.lone_p50:g}x)")
        elif stock and (want := targets.crowd_ratio(level)) is not None:
            best = max(stock.values(), key=lambda s: s.rps)
            line(p.rps >= want * best.rps, f"c={level} throughput {p.rps / best.rps:.2f}x the best stock configuration (target >= {want:g}x)")
            if lit is not None:
                line(None if targets.litserve is None else p.rps >= targets.litserve * lit.rps,
                     f"c={level} throughput {p.rps / lit.rps:.2f}x LitServe" + ("" if targets.litserve is None else f" (target >= {targets.litserve:g}x)"))
        if stock and level >= 32 and targets.crowd_p99 is not None:
            best_p99 = min(s.p99 for s in stock.values())
            line(p.p99 <= targets.crowd_p99 * best_p99,
                 f"c={level} p99 {p.p99:.2f} ms, {p.p99 / best_p99:.2f}x the best stock p99 {best_p99:.2f} ms (target <= {targets.crowd_p99:g}x)")
        line(p.errors == 0, f"c={level} errors: {p.errors}")
    return out


def plain_verdicts(table: dict[tuple[str, int], Summary], levels: Sequence[int], targets: Targets = Targets()) -> list[str]:
    """On a stock TorchServe, the project's archive against the stock handler: less server CPU per request, and the
    throughput targets where ``targets.plain`` sets one."""
    out = []
    wanted = dict(targets.plain)
    for level in levels:
        plain, stock = table.get(("plain", level)), table.get(("stock-b1", level))
        if plain is None or stock is None:
            continue
        ok = plain.server_cpu_us < stock.server_cpu_us
        out.append(f"- {'met' if ok else '**missed**'}: c={level} server CPU {plain.server_cpu_us:,.0f} vs the stock handler's "
                   f"{stock.server_cpu_us:,.0f} µs/request ({plain.server_cpu_us / stock.server_cpu_us:.2f}x; target < 1)")
        want = wanted.get(level)
        ratio = plain.rps / stock.rps
        verdict = "(reported)" if want is None else "met:" if ratio >= want else "**missed**:"
        out.append(f"- {verdict} c={level} throughput {ratio:.2f}x the stock handler's" + ("" if want is None else f" (target >= {want:g}x)"))
    return out


def host_verdicts(table: dict[tuple[str, int], Summary], levels: Sequence[int]) -> list[str]:
    """KServe's model server against LitServe on the same weights (target: ahead at every level); Ray beside them."""
    out = []
    for level in levels:
        kserve, lit, ray = table.get(("kserve", level)), table.get(("litserve", level)), table.get(("ray", level))
        if kserve is not None and lit is not None:
            out.append(f"- {'met' if kserve.rps > lit.rps and kserve.errors == 0 else '**missed**'}: c={level} KServe's server "
                       f"{kserve.rps / lit.rps:.2f}x LitServe's req/s (target > 1x)")
        if ray is not None and lit is not None:
            out.append(f"- (reported) c={level} Ray Serve {ray.rps / lit.rps:.2f}x LitServe's req/s, p50 {ray.p50:.2f} ms")
    return out


def host_table(hosts: dict[str, dict[str, float]]) -> list[str]:
    rows = ["| host | cold start (process start to first answer) | resident memory after warm-up | processes |", "|---|---:|---:|---:|"]
    rows += [f"| {name} | {h['cold_start_s']:.1f} s | {h['rss_mib']:,.0f} MiB | {h['processes']:.0f} |" for name, h in hosts.items()]
    return rows


def markdown(model: str, table: dict[tuple[str, int], Summary], names: Sequence[str], levels: Sequence[int], answer: str = "",
             hosts: dict[str, dict[str, float]] | None = None) -> str:
    said = [f"Every system answers the body with the same {answer} (checked before measuring).", ""] if answer else []
    rows = [f"### `{model}`", "", *said,
            "| system | clients | req/s (range) | p50 ms | p90 ms | p99 ms | errors | server CPU µs/req | wrk cores |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for level in levels:
        for name in names:
            s = table.get((name, level))
            if s:
                rows.append(f"| {name} | {level} | {s.rps:,.0f} ({s.rps_low:,.0f}-{s.rps_high:,.0f}) | {s.p50:.2f} | {s.p90:.2f} | {s.p99:.2f} | "
                            f"{s.errors} | {s.server_cpu_us:,.0f} | {s.client_core:.2f} |")
    targets = roles_table(table, names, levels)
    goals = TARGETS.get(model, Targets())
    plain = plain_verdicts(table, levels, goals)
    if plain:
        targets += ["", f"On a plain TorchServe (stock config), the archive's handler vs a stock `BaseHandler` ({model}):", *plain]
    for system in ("project", "project-1ms"):
        found = verdicts(table, levels, system, goals)
        if found:
            targets += ["", f"Targets, `{system}` ({model}):", *found]
    others = host_verdicts(table, levels)
    if others:
        targets += ["", f"The other hosts ({model}):", *others]
    if hosts:
        targets += ["", *host_table(hosts)]
    return "\n".join([*rows, *targets, ""])


def plot(results: dict[str, dict[tuple[str, int], Summary]], names: Sequence[str], levels: Sequence[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    for row, (model, table) in enumerate(results.items()):
        for name in names:
            pts = [(level, table[(name, level)]) for level in levels if (name, level) in table]
            if not pts:
                continue
            style = {"linewidth": 3 if name == "project" else 1.4, "marker": "o", "label": name}
            axes[row][0].plot([x for x, _ in pts], [s.rps for _, s in pts], **style)
            axes[row][1].plot([x for x, _ in pts], [s.p99 for _, s in pts], **style)
        concurrency_axes(axes[row][0], axes[row][1], levels, model)
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)


def versions() -> str:
    found = []
    for package in ("torch", "torchserve", "litserve"):
        try:
            from importlib.metadata import version

            found.append(f"{package} {version(package)}")
        except Exception:  # noqa: BLE001 - a missing package is reported as such
            found.append(f"{package} (not installed)")
    java = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False).stderr.splitlines()
    wrk = subprocess.run([wrk_path(), "--version"], capture_output=True, text=True, check=False).stdout.split(" [")[0].strip()
    return ", ".join([*found, java[0] if java else "java ?", wrk, f"Python {platform.python_version()}"])


START, END = "<!-- ts-bench:start -->", "<!-- ts-bench:end -->"


def write_doc(path: Path, generated: str) -> None:
    """Replace the generated block of ``path`` (between the markers), keeping the hand-written text around it."""
    block = f"{START}\n{generated}\n{END}"
    if path.is_file() and START in path.read_text() and END in path.read_text():
        text = path.read_text()
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = f"# Benchmarks\n\n{block}\n"
    path.write_text(text)


def header(args: argparse.Namespace, longer: dict[str, float]) -> str:
    """Machine, versions, date and method; ``longer``: the models whose cells last longer than ``--seconds``."""
    exceptions = "".join(f", {s:g} s for `{m}`" for m, s in longer.items())
    return "\n".join([
        f"`make bench` on {machine()}, {datetime.date.today().isoformat()}; {versions()}.",
        f"`wrk` closed loop, keep-alive; {args.warmup:g} s warm-up per system, then {args.repeats} interleaved repeats of "
        f"{args.seconds:g} s per cell{exceptions}"
        + (f", and {args.lone_repeats - args.repeats} more of each 1-client cell" if args.lone_repeats > args.repeats else "")
        + f"; each cell after {args.settle:g} s of its load unmeasured (req/s and latencies: medians over the repeats, "
        "req/s with its range); "
        + ("every system running throughout." if args.together else "each system measured alone, the others stopped (SIGSTOP) meanwhile."),
    ])


def _tables(rows: list[dict]) -> dict[tuple[str, int], Summary]:
    """Recorded cells back into summaries per (system, level)."""
    grouped: dict[tuple[str, int], list[Cell]] = {}
    for row in rows:
        cell = Cell(row["system"], row["repeat"], LoadResult.from_dict(row), row["server_cpu_us"], row.get("roles_us", {}))
        grouped.setdefault((cell.system, cell.result.concurrency), []).append(cell)
    return {key: summarise(cells) for key, cells in grouped.items()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="net,digits,resnet18,sentiment,spoken_digits",
                        help="comma-separated: net, digits, resnet18, sentiment, spoken_digits (default: %(default)s)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, of: " + ", ".join(SYSTEMS))
    parser.add_argument("--levels", default="1,8,32,64", help="concurrent clients (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per cell (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats (default: %(default)s)")
    parser.add_argument("--lone-repeats", type=int, default=4,
                        help="repeats of the 1-client cells, the extra ones after the others (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=15.0, help="warm-up seconds per system (default: %(default)s)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of each cell's load, unmeasured, before it (default: %(default)s)")
    parser.add_argument("--together", action="store_true",
                        help="keep every system running while one is measured (default: the others are stopped with SIGSTOP meanwhile)")
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--image", type=Path, default=Path("docs/images/digit.png"), help="the PNG body for digits")
    parser.add_argument("--review", type=Path, default=Path("docs/review.txt"), help="the text body for sentiment")
    parser.add_argument("--clip", type=Path, default=Path("docs/seven.wav"), help="the WAV body for spoken_digits")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="the page (its .png and .json go beside it)")
    parser.add_argument("--from-json", type=Path, help="render the page again from a previous run's .json, without measuring")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = [n for n in args.systems.split(",") if n]
    levels = [int(c) for c in args.levels.split(",") if c]
    unknown = sorted(set(names) - set(SYSTEMS))
    try:
        if args.from_json:
            recorded = json.loads(args.from_json.read_text())
        else:
            wrk_path()
            if unknown:
                raise ScriptError(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
            works = workloads(args.image, args.review, args.clip)
            chosen = [m for m in args.models.split(",") if m]
            for model in chosen:
                if model not in works:
                    raise ScriptError(f"unknown model {model!r}: ts-bench knows {', '.join(works)}")
            archives = {model: ensure_archive(works[model], args.model_store, lambda line: print(line, file=sys.stderr, flush=True)) for model in chosen}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            longer = {m: works[m].min_seconds for m in chosen if works[m].min_seconds > args.seconds}
            recorded = {"header": header(args, longer), "names": names, "levels": levels, "profiles": {}, "cells": {}, "answers": {}, "hosts": {}}
            for model in chosen:
                work = works[model]
                print(f"{model}: profiling one batch in-process (TorchServe's Service.predict and the handler's stages)", file=sys.stderr)
                recorded["profiles"][model] = profile_table(model, profile_archive(archives[model], work.body, work.content_type))
                cells, recorded["answers"][model], recorded["hosts"][model] = bench(work, names, levels, args.seconds, args.repeats, args.warmup, archives[model].parent,
                                                          lambda line: print(line, file=sys.stderr, flush=True), not args.together, args.settle,
                                                          args.lone_repeats)
                recorded["cells"][model] = [{"system": c.system, "repeat": c.repeat, "server_cpu_us": round(c.server_cpu_us, 1),
                                             "roles_us": {k: round(v, 1) for k, v in c.roles_us.items()}, **c.result.to_dict()}
                                            for value in cells.values() for c in value]
                args.out.with_suffix(".json").write_text(json.dumps(recorded, indent=1) + "\n")  # after each model: a later failure keeps it
    except (ScriptError, subprocess.CalledProcessError) as err:
        print(f"bench: error: {getattr(err, 'message', err)}", file=sys.stderr)
        return 1
    names, levels = recorded["names"], recorded["levels"]
    results = {model: _tables(rows) for model, rows in recorded["cells"].items()}
    png = args.out.with_suffix(".png")
    plot(results, names, levels, png)
    generated = "\n".join([
        recorded["header"],
        "",
        *[markdown(model, table, names, levels, recorded.get("answers", {}).get(model, ""), recorded.get("hosts", {}).get(model))
          for model, table in results.items()],
        f"![req/s and p99 against concurrent clients, per system]({png.name})",
        "",
        "### Inside the worker: one batch, stage by stage",
        "",
        "In-process, the archive loaded as a worker loads it, batches fed through TorchServe's `Service.predict` "
        "(µs per batch; *TorchServe's own*: its Python around the handler).",
        "",
        *[recorded["profiles"][model] + "\n" for model in results],
    ])
    write_doc(args.out, generated)
    print(generated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
