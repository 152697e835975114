"""The benchmark's bookkeeping: wrk's script and result, the targets, the generated block of the docs page."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from serveready.scripts.loadgen import Load, LoadResult, lua_script, parse_result
from tools.bench import START, TARGETS, Cell, Summary, System, alone, main, plain_verdicts, role, schedule, summarise, verdicts, write_doc


def test_lua_script_posts_the_body_with_the_key(tmp_path: Path) -> None:
    body = tmp_path / "row.json"
    body.write_text("{}")
    script = lua_script(Load("http://127.0.0.1:1/predictions/net", body, "application/json", "k3y"))
    assert 'wrk.method = "POST"' in script and str(body) in script
    assert "wrk.headers['Authorization'] = 'Bearer k3y'" in script
    assert "Authorization" not in lua_script(Load("http://x/", body, "image/png"))


def test_result_line_becomes_rates_and_milliseconds() -> None:
    out = "Running 2s test\nRESULT {\"requests\": 3000, \"duration_us\": 2000000, \"status_errors\": 2, \"socket_errors\": 1, " \
          "\"p50_us\": 850, \"p90_us\": 1200, \"p99_us\": 4100, \"max_us\": 9000}\n"
    r = parse_result(out, concurrency=8, client_cpu_s=0.1)
    assert (r.rps, r.errors, r.p50_ms, r.p90_ms, r.p99_ms, r.concurrency) == (1500.0, 3, 0.85, 1.2, 4.1, 8)


def _s(rps: float, p50: float, p99: float, errors: int = 0) -> Summary:
    return Summary(rps, rps, rps, p50, p50, p99, errors, 100.0, 0.05)


def test_verdicts_compare_with_the_right_baseline() -> None:
    table = {
        ("project", 1): _s(1000, 0.9, 2.0), ("stock-b1", 1): _s(1000, 0.8, 3.0), ("stock-tuned", 1): _s(150, 6.5, 7.0),
        ("project", 32): _s(6900, 4.0, 9.0), ("stock-b1", 32): _s(2000, 15, 30), ("stock-tuned", 32): _s(6000, 5, 10),
        ("litserve", 32): _s(2000, 15, 20),
    }
    lines = verdicts(table, [1, 32])
    assert "- met: c=1 throughput 1.00x stock-b1 (target >= 0.9x)" in lines
    assert "- met: c=1 p50 1.12x the lowest stock p50 (stock-b1's; target <= 1.2x)" in lines
    assert "- **missed**: c=32 throughput 1.15x the best stock configuration (target >= 1.5x)" in lines  # the tuned one, not b1
    assert "- met: c=32 throughput 3.45x LitServe (target >= 3x)" in lines
    table[("project", 32)] = _s(6000, 4.0, 11.0, errors=1)
    lines = verdicts(table, [32])
    assert "- **missed**: c=32 throughput 1.00x the best stock configuration (target >= 1.5x)" in lines
    assert "- met: c=32 p99 11.00 ms, 1.10x the best stock p99 10.00 ms (target <= 1.1x)" in lines
    assert "- **missed**: c=32 errors: 1" in lines
    table[("project", 32)] = _s(9100, 4.0, 11.5)
    lines = verdicts(table, [32])
    assert "- met: c=32 throughput 1.52x the best stock configuration (target >= 1.5x)" in lines
    assert "- **missed**: c=32 p99 11.50 ms, 1.15x the best stock p99 10.00 ms (target <= 1.1x)" in lines


def test_the_compute_bound_model_has_targets_of_its_own() -> None:
    """resnet18: >= 1.1x the best stock set-up from 8 clients on, a lone client's p50 within 1.1x of the lowest stock
    p50; its throughput at 1 client and against LitServe are reported, not judged."""
    table = {
        ("project", 1): _s(24, 42.0, 60), ("stock-b1", 1): _s(21, 41.5, 135), ("stock-tuned", 1): _s(15, 66.0, 76),
        ("project", 64): _s(41, 1500, 1600), ("stock-b1", 64): _s(11, 3000, 4000), ("stock-tuned", 64): _s(35, 1700, 1700),
        ("litserve", 64): _s(38, 1600, 1700),
    }
    lines = verdicts(table, [1, 64], targets=TARGETS["resnet18"])
    assert "- (reported) c=1 throughput 1.14x stock-b1" in lines
    assert "- met: c=1 p50 1.01x the lowest stock p50 (stock-b1's; target <= 1.1x)" in lines
    assert "- met: c=64 throughput 1.17x the best stock configuration (target >= 1.1x)" in lines
    assert "- (reported) c=64 throughput 1.08x LitServe" in lines
    assert not any("p99" in line for line in lines)
    table[("project", 1)] = _s(20, 47.0, 60)
    assert "- **missed**: c=1 p50 1.13x the lowest stock p50 (stock-b1's; target <= 1.1x)" in verdicts(table, [1], targets=TARGETS["resnet18"])


def test_plain_host_is_judged_on_cpu_and_throughput() -> None:
    table = {("plain", 1): _s(1000, 1, 2), ("stock-b1", 1): _s(1000, 1, 2), ("plain", 8): _s(2150, 1, 2), ("stock-b1", 8): _s(2000, 1, 2),
             ("plain", 64): _s(1500, 1, 2), ("stock-b1", 64): _s(1000, 1, 2)}
    table[("plain", 8)] = dataclasses.replace(table[("plain", 8)], server_cpu_us=90.0)
    lines = plain_verdicts(table, [1, 8, 64])
    assert "- met: c=1 throughput 1.00x the stock handler's (target >= 1x)" in lines
    assert "- **missed**: c=1 server CPU 100 vs the stock handler's 100 µs/request (1.00x; target < 1)" in lines
    assert "- **missed**: c=8 throughput 1.07x the stock handler's (target >= 1.1x)" in lines
    assert "- met: c=8 server CPU 90 vs the stock handler's 100 µs/request (0.90x; target < 1)" in lines
    assert "- (reported) c=64 throughput 1.50x the stock handler's" in lines


def _statuses(procs: list[psutil.Process], expected: list[str], timeout: float = 5.0) -> list[str]:
    """The processes' states once they are ``expected`` or ``timeout`` has passed: signals are delivered
    asynchronously, and a process just started may still be running its exec."""
    deadline = time.monotonic() + timeout
    while (found := [p.status() for p in procs]) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


def test_a_system_is_measured_alone_and_its_neighbours_resume(tmp_path: Path) -> None:
    """The other systems' processes are stopped (SIGSTOP) while one is measured, and continued afterwards, even when
    the measurement fails; processes a system shares with the measured one keep running."""
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        measured = System("project", "", None, [procs[0].pid, procs[2].pid], b"", "")
        neighbour = System("ray", "", None, [procs[1].pid, procs[2].pid], b"", "")
        state = [psutil.Process(p.pid) for p in procs]
        assert _statuses(state, ["sleeping"] * 3) == ["sleeping"] * 3
        with pytest.raises(RuntimeError), alone(measured, [measured, neighbour]):
            assert _statuses(state, ["sleeping", "stopped", "sleeping"]) == ["sleeping", "stopped", "sleeping"]
            raise RuntimeError("a cell failed")
        assert _statuses(state, ["sleeping"] * 3) == ["sleeping"] * 3
        with alone(measured, [measured, neighbour], freeze=False):
            assert state[1].status() == "sleeping"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_server_cpu_is_told_apart_by_process() -> None:
    assert role(["/usr/lib/jvm/java-17/bin/java", "-cp", "model-server.jar"]) == "Java frontend"
    assert role(["/venv/bin/python", "/venv/lib/ts/model_service_worker.py", "--sock-type", "unix"]) == "Python workers"
    assert role(["ray::ProxyActor"]) == "Serve's HTTP proxy"
    assert role(["ray::ServeReplica:serveready:Ingress"]) == "ingress replica"
    assert role(["ray::ServeReplica:serveready:net"]) == "model replicas"
    assert role(["/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server", "--log_dir=/tmp"]) == "Ray's own processes"
    assert role(["python", "-m", "serveready.kserve", "--model_dir", "model_store"]) == "server"


def test_generated_block_replaces_only_itself(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    write_doc(page, "first numbers")
    assert page.read_text().startswith("# Benchmarks") and "first numbers" in page.read_text()
    page.write_text("# Mine\n\nintro\n\n" + page.read_text().split("\n", 2)[2] + "\n## Where the time goes\nanalysis\n")
    write_doc(page, "second numbers")
    text = page.read_text()
    assert "intro" in text and "analysis" in text and "second numbers" in text and "first numbers" not in text
    assert text.count(START) == 1


def test_page_is_rendered_again_from_the_recorded_run(tmp_path: Path) -> None:
    def row(system: str, level: int, rps: float, p99_ms: float, repeat: int = 0) -> dict:
        return {"system": system, "repeat": repeat, "server_cpu_us": 300.0, "concurrency": level, "seconds": 4.0, "requests": int(rps * 4),
                "errors": 0, "rps": rps, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": p99_ms, "max_ms": 9.0, "client_cpu_s": 0.2}

    recorded = {"header": "measured here", "names": ["project", "stock-b1"], "levels": [1, 8], "profiles": {"net": "| profile |"},
                "cells": {"net": [row("project", 1, 1000, 2.0), row("project", 1, 1200, 2.0, 1), row("stock-b1", 1, 1000, 3.0),
                                  row("project", 8, 5000, 3.0), row("stock-b1", 8, 2500, 9.0)]}}
    source = tmp_path / "run.json"
    source.write_text(json.dumps(recorded))
    page = tmp_path / "benchmarks.md"
    assert main(["--from-json", str(source), "--out", str(page)]) == 0
    text = page.read_text()
    assert "| project | 1 | 1,100 (1,000-1,200) | 1.00 | 2.00 | 2.00 | 0 | 300 | 0.05 |" in text  # the median (of two: their mean) and range of the repeats
    assert "Targets, `project` (net):" in text and "- met: c=8 throughput 2.00x the best stock configuration (target >= 1.1x)" in text
    assert "measured here" in text and "| profile |" in text and (tmp_path / "benchmarks.png").read_bytes()[:4] == b"\x89PNG"


def test_the_lone_client_gets_more_repeats_after_the_interleaved_ones() -> None:
    plan = schedule(["a", "b"], [1, 8], repeats=2, lone_repeats=4)
    assert plan == [(0, 1, "a"), (0, 1, "b"), (0, 8, "a"), (0, 8, "b"),
                    (1, 1, "b"), (1, 1, "a"), (1, 8, "b"), (1, 8, "a"),  # the order rotates each repeat
                    (2, 1, "a"), (2, 1, "b"), (3, 1, "b"), (3, 1, "a")]
    assert schedule(["a", "b"], [8, 32], repeats=1, lone_repeats=3) == [(0, 8, "a"), (0, 8, "b"), (0, 32, "a"), (0, 32, "b")]
    assert schedule(["a"], [1], repeats=3, lone_repeats=1) == [(0, 1, "a"), (1, 1, "a"), (2, 1, "a")]


def test_one_slow_repeat_does_not_move_a_summary() -> None:
    def cell(rps: float, p50: float, repeat: int) -> Cell:
        result = LoadResult(concurrency=1, seconds=10.0, requests=int(rps * 10), errors=0, rps=rps, p50_ms=p50, p90_ms=p50, p99_ms=p50,
                            max_ms=p50, client_cpu_s=0.1)
        return Cell("project", repeat, result, 60_000.0)

    summary = summarise([cell(25, 40.0, 0), cell(24, 41.0, 1), cell(12, 88.0, 2), cell(25, 39.0, 3)])
    assert (summary.rps, summary.rps_low, summary.rps_high) == (24.5, 12, 25)
    assert summary.p50 == 40.5  # the mean would be 52.0
