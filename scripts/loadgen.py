"""Closed-loop HTTP load with ``wrk`` (used by ``ts-bench`` and ``ts-archive tune``).

``wrk`` is a C event loop: one thread keeps 64 keep-alive connections busy for ~0.05 of
a core on this machine, so on 2 cores the server, not the client, sets the numbers (a
Python client would take most of a core at 4,000 requests/s). Each run reports the
client's own CPU so that can be checked.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .runinfo import ScriptError

# done() runs once per wrk thread set; latency values are microseconds.
_LUA = """
wrk.method = "POST"
local f = assert(io.open({body!r}, "rb"))
wrk.body = f:read("*all")
f:close()
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {{"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class Load:
    """One request, as wrk will send it over and over."""

    url: str
    body: Path
    content_type: str
    token: str | None = None


@dataclass(frozen=True)
class LoadResult:
    """What one closed-loop run measured (latencies in ms)."""

    concurrency: int
    seconds: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    client_cpu_s: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float | int]) -> LoadResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})  # type: ignore[arg-type]


def wrk_path() -> str:
    """The wrk binary, or a ScriptError that says how to get one."""
    path = shutil.which("wrk")
    if path is None:
        raise ScriptError("wrk is not installed: it is the load generator (`apt-get install wrk` on Debian/Ubuntu, `brew install wrk` on macOS)")
    return path


def lua_script(load: Load) -> str:
    """The wrk script that POSTs ``load.body`` and prints one RESULT line of JSON."""
    headers = {"Content-Type": load.content_type}
    if load.token:
        headers["Authorization"] = f"Bearer {load.token}"
    lines = "\n".join(f"wrk.headers[{k!r}] = {v!r}" for k, v in headers.items())
    return _LUA.format(body=str(load.body.resolve()), headers=lines)


def parse_result(stdout: str, concurrency: int, client_cpu_s: float) -> LoadResult:
    """Read the RESULT line that ``lua_script``'s done() prints."""
    match = re.search(r"^RESULT (\{.*\})$", stdout, re.MULTILINE)
    if match is None:
        raise ScriptError(f"wrk printed no result:\n{stdout[-2000:]}")
    raw = json.loads(match.group(1))
    seconds = raw["duration_us"] / 1e6
    return LoadResult(
        concurrency=concurrency,
        seconds=round(seconds, 3),
        requests=raw["requests"],
        errors=raw["status_errors"] + raw["socket_errors"],
        rps=raw["requests"] / seconds if seconds else 0.0,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        client_cpu_s=round(client_cpu_s, 3),
    )


def run_wrk(load: Load, concurrency: int, seconds: float, timeout_s: float = 10.0, settle: bool = True) -> LoadResult:
    """``concurrency`` keep-alive connections, each sending its next request when the last is answered; then,
    with ``settle``, :func:`drain` (a caller that reads the server's CPU over the run drains after reading it)."""
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        script = Path(tmp, "post.lua")
        script.write_text(lua_script(load))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        command = [wrk_path(), "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", f"--timeout={timeout_s:g}s",
                   "-s", str(script), load.url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + timeout_s + 30)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise ScriptError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if settle:
        drain(load)
    return parse_result(done.stdout, concurrency, cpu)


def drain(load: Load, timeout: float = 300.0) -> None:
    """Wait out what a run left queued: wrk stops sending, but the server still computes the requests it holds
    (for a 40 ms model at 64 clients, seconds of work). One more request, answered after them (the queues are
    first in, first out), so the next measurement starts on an idle server."""
    import requests

    headers = {"Content-Type": load.content_type, **({"Authorization": f"Bearer {load.token}"} if load.token else {})}
    try:
        requests.post(load.url, data=load.body.read_bytes(), headers=headers, timeout=timeout)
    except requests.RequestException:
        pass  # a server that fails it will fail the next measurement visibly
