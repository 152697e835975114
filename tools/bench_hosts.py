"""The same archives on the other hosts, for ``make bench``: KServe's model server and Ray Serve (docs/hosts.md).

Each is started as a user starts it, on free loopback ports, with 2 server processes (KServe's
``--workers 2``; 2 Ray replicas of 1 CPU each), the archive's own batch size and no wait; each
stops with its whole process tree. Ray runs as ``serve run`` of the config ``ts-archive ray``
writes, a single-node Ray of its own under a temp dir of its own (``RAY_TMPDIR``), so a Ray the
user runs elsewhere is left alone.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import requests

from serveready.scripts.runinfo import ScriptError
from serveready.scripts.server import free_ports

BIN = Path(sys.executable).parent


def _wait(url: str, ok: Callable[[requests.Response], bool], process: subprocess.Popen, log: Path, timeout: float, what: str,
          stop: Callable[[], None]) -> None:
    """Until ``url`` answers ``ok``; a host that exits or is not ready in time is stopped (``stop``) before the error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop()
            raise ScriptError(f"{what} exited ({process.returncode}); see {log}")
        with contextlib.suppress(requests.RequestException):
            if ok(requests.get(url, timeout=2)):
                return
        time.sleep(0.3)
    stop()  # a supervisor that keeps restarting its copies would otherwise outlive the bench
    raise ScriptError(f"{what} was not ready within {timeout:.0f}s; see {log}")


def start_kserve(model: str, store: Path, log: Path, workers: int = 2, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """``python -m serveready.kserve`` serving one archive; its TorchServe-style prediction URL."""
    http, grpc = free_ports(2)
    command = [sys.executable, "-m", "serveready.kserve", "--model_dir", str(store.resolve()), "--model_name", model, "--http_port", str(http),
               "--grpc_port", str(grpc), "--enable_grpc", "false", "--workers", str(workers)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=log.parent)
    _wait(f"http://127.0.0.1:{http}/v2/models/{model}/ready", lambda r: r.status_code == 200, process, log, timeout, "KServe's model server",
          lambda: stop_processes(tree(process.pid)))
    return process, f"http://127.0.0.1:{http}/predictions/{model}"


def start_ray(model: str, store: Path, scratch: Path, log: Path, replicas: int = 2, timeout: float = 300.0) -> tuple[subprocess.Popen, str, Path]:
    """``serve run`` of ``ts-archive ray``'s config for one archive on a private single-node Ray; its prediction URL
    and the Ray temp dir (whose processes :func:`stop_ray` also stops)."""
    [port] = free_ports(1)
    config = scratch / "serve_config.yaml"
    subprocess.run([str(BIN / "ts-archive"), "ray", "--store", str(store.resolve()), model, "--out", str(config), "--port", str(port),
                    "--num-cpus", "1", "--replicas", str(replicas)], check=True, capture_output=True)
    temp = Path(tempfile.mkdtemp(prefix="sr-bench-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    # RAY_AUTH_MODE explicit: a local Ray 2.60 otherwise writes ~/.ray/auth_token into the user's home, after which
    # every later `ray start` turns token auth on (and nodes started without the token cannot join)
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    with open(log, "wb") as out:
        process = subprocess.Popen([str(BIN / "serve"), "run", str(config)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=env, cwd=scratch)
    _wait(f"http://127.0.0.1:{port}/v2/models/{model}/ready", lambda r: r.status_code == 200, process, log, timeout, "Ray Serve",
          lambda: stop_ray(process, temp))
    return process, f"http://127.0.0.1:{port}/predictions/{model}", temp


def ray_processes(temp: Path) -> list[psutil.Process]:
    """What the private Ray left running: processes whose command line names its temp dir, and their children."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        if str(temp) in " ".join(process.info["cmdline"] or []):
            found[process.pid] = process
            with contextlib.suppress(psutil.Error):
                found.update({c.pid: c for c in process.children(recursive=True)})
    return list(found.values())


def stop_processes(processes: list[psutil.Process]) -> None:
    """SIGTERM, 10 s, then SIGKILL for what is left."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def stop_ray(process: subprocess.Popen, temp: Path) -> None:
    """``serve run`` stops its Ray on SIGINT; whatever is left of that Ray then goes by its temp dir."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(30)
    stop_processes([*tree(process.pid), *ray_processes(temp)])


def tree(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


__all__ = ["ray_processes", "start_kserve", "start_ray", "stop_processes", "stop_ray", "tree"]
