"""The tuner's decisions, from recorded measurements: the grid it prunes, the front, the pick, the write-back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from serveready.archiver.tune import (
    Candidate,
    Measurement,
    Point,
    candidates,
    pareto_front,
    pick,
    set_section_keys,
    write_choice,
)
from serveready.scripts.archive import main as archive_main
from tests.conftest import EXAMPLES


def _m(label: tuple[int, int, int, int], *points: tuple[int, float, float, int]) -> Measurement:
    return Measurement(Candidate(*label), tuple(Point(c, rps, p99 / 2, p99, err) for c, rps, p99, err in points))


# A tiny grid as a sweep recorded it: c=1 and c=64, req/s and p99 ms.
RECORDED = [
    _m((1, 2, 0, 1), (1, 1500, 2.0, 0), (64, 3000, 55.0, 0)),   # geo-mean 2121, p99 over a 50 ms bound in a crowd
    _m((2, 8, 1, 1), (1, 500, 3.4, 0), (64, 7000, 15.0, 0)),    # geo-mean 1871: the best that fits
    _m((2, 16, 5, 1), (1, 150, 8.0, 0), (64, 9000, 60.0, 0)),   # geo-mean 1162, p99 over a 50 ms bound
    _m((1, 8, 1, 2), (1, 480, 3.5, 0), (64, 6800, 18.0, 0)),    # beaten by (2, 8, 1, 1) on both axes
    _m((2, 1, 0, 1), (1, 1400, 2.5, 0), (64, 9000, 14.0, 3)),   # errors: never picked
]


def test_grid_is_pruned_by_what_torchserve_does() -> None:
    grid = candidates(cores=2)
    assert all(c.workers * c.threads <= 2 for c in grid)
    assert all(c.max_batch_delay == 0 for c in grid if c.batch_size == 1)  # no delay without batching
    assert all(c.batch_size <= 2 for c in grid if c.max_batch_delay == 0)  # delay 0 takes at most 2 requests
    assert Candidate(1, 1, 0, 2) in grid and Candidate(2, 1, 0, 2) not in grid
    # per (workers, threads): b1, b2 d0, and {4, 8, 16} x {1, 5}; (1,1), (1,2), (2,1)
    assert len(grid) == 3 * (1 + 1 + 3 * 2) == len(set(grid))


def test_with_the_no_wait_aggregator_every_batch_size_without_delay_is_a_candidate() -> None:
    grid = candidates(cores=2, no_wait=True)
    assert {c.batch_size for c in grid if c.max_batch_delay == 0} == {1, 4, 8, 16}
    assert len(grid) == 3 * (1 + 3 * 3) == len(set(grid))  # per (workers, threads): b1, and {4, 8, 16} x {0, 1, 5}


def test_thread_counts_given_may_share_the_cores_between_workers() -> None:
    """By default workers x threads stay within the cores; counts given explicitly may oversubscribe them (a
    model that computes in batches gains from it), never beyond the cores per worker."""
    grid = candidates(cores=2, workers=(1, 2), batch_sizes=(1, 8), delays=(0,), threads=(1, 2, 4), no_wait=True)
    assert sorted((c.workers, c.threads) for c in grid if c.batch_size == 8) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert Candidate(2, 1, 0, 2) not in grid  # at batch 1 a worker keeps to its share of the cores (worker_threads)


def test_pick_takes_the_highest_throughput_that_meets_the_bound() -> None:
    assert pick(RECORDED, p99_ms=50).candidate == Candidate(2, 8, 1, 1)
    assert pick(RECORDED, p99_ms=100).candidate == Candidate(1, 2, 0, 1)  # the bound admits it: highest geometric mean
    assert pick(RECORDED, p99_ms=10) is None  # nothing keeps p99 within 10 ms at every level
    assert pick(RECORDED[:1], p99_ms=60).candidate == Candidate(1, 2, 0, 1)


def test_a_lone_client_must_not_wait_for_a_batch() -> None:
    # p50 at c=1 (half the p99 above): 1.0, 1.7, 4.0, 1.75 ms (and 1.25 with errors, never the reference);
    # allowed: the best + max(25%, 0.5 ms) = 1.5 ms
    assert pick(RECORDED, p99_ms=100, lone_slowdown=1.25).candidate == Candidate(1, 2, 0, 1)
    assert pick(RECORDED, p99_ms=50, lone_slowdown=1.25) is None  # the only fast-alone setting breaks the bound
    assert pick(RECORDED, p99_ms=50, lone_slowdown=2.0).candidate == Candidate(2, 8, 1, 1)
    assert pick(RECORDED, p99_ms=50, lone_slowdown=None).candidate == Candidate(2, 8, 1, 1)


def test_score_weighs_a_lone_client_like_a_crowd() -> None:
    scores = {m.candidate.label: round(m.score) for m in RECORDED}
    assert scores["w1 b2 d0 t1"] == round((1500 * 3000) ** 0.5)
    assert scores["w2 b8 d1 t1"] == round((500 * 7000) ** 0.5)


def test_pareto_front_drops_dominated_and_failing_settings() -> None:
    # (score, worst p99): w1 b2 d0 (2121, 55), w2 b8 d1 (1871, 15), w2 b16 d5 (1162, 60), w1 b8 d1 t2 (1807, 18)
    front = [m.candidate for m in pareto_front(RECORDED)]
    assert front == [Candidate(1, 2, 0, 1), Candidate(2, 8, 1, 1)]  # best throughput first; errors never count


def test_section_keys_are_set_and_comments_kept() -> None:
    text = "name: x\nserve:                # copied\n  minWorkers: 1\n  batchSize: 8   # rows\n\nhandler:\n  entry: tabular\n"
    out = set_section_keys(text, "serve", {"batchSize": 16, "maxBatchDelay": 1})
    assert "  batchSize: 16   # rows" in out and "  maxBatchDelay: 1" in out and "# copied" in out
    assert yaml.safe_load(out) == {"name": "x", "serve": {"minWorkers": 1, "batchSize": 16, "maxBatchDelay": 1}, "handler": {"entry": "tabular"}}
    added = set_section_keys("name: x\n", "serve", {"batchSize": 4})
    assert yaml.safe_load(added)["serve"] == {"batchSize": 4}


def test_write_choice_rewrites_serve_and_threads_once(tmp_path: Path) -> None:
    config = tmp_path / "net.yaml"
    shutil.copy(EXAMPLES / "net" / "model_configs" / "net.yaml", config)
    before = yaml.safe_load(config.read_text())
    for note in ("first run", "second run"):
        write_choice(config, RECORDED[1], note)
    after = yaml.safe_load(config.read_text())
    assert after["serve"] | {"minWorkers": 0, "maxWorkers": 0, "batchSize": 0, "maxBatchDelay": 0} == before["serve"] | {
        "minWorkers": 0, "maxWorkers": 0, "batchSize": 0, "maxBatchDelay": 0}
    assert (after["serve"]["minWorkers"], after["serve"]["maxWorkers"], after["serve"]["batchSize"], after["serve"]["maxBatchDelay"]) == (2, 2, 8, 1)
    assert after["handler"]["torch_threads"] == 1
    assert {k: v for k, v in after.items() if k not in ("serve", "handler")} == {k: v for k, v in before.items() if k not in ("serve", "handler")}
    text = config.read_text()
    assert text.count("# tuned: second run") == 1 and "first run" not in text
    assert text.index("# tuned: second run") < text.index("\nserve:")


def test_tune_command_picks_and_writes_from_recorded_measurements(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = shutil.copytree(EXAMPLES / "net", tmp_path / "net", ignore=shutil.ignore_patterns("artifacts", "data", "__pycache__"))
    configs = folder / "model_configs"
    for variant in configs.glob("net_*.yaml"):
        variant.unlink()
    recorded = tmp_path / "net.json"
    recorded.write_text(json.dumps({"levels": [1, 64], "seconds": 3, "screen_seconds": 2, "machine": "test machine",
                                    "measurements": [m.to_dict() for m in RECORDED]}))
    out = tmp_path / "tuning"
    code = archive_main(["--configs", str(configs), "tune", "net", "--from-json", str(recorded), "--p99-ms", "50", "--lone-slowdown", "2",
                         "--out", str(out)])
    assert code == 0
    written = yaml.safe_load((configs / "net.yaml").read_text())
    assert (written["serve"]["batchSize"], written["serve"]["maxBatchDelay"], written["serve"]["minWorkers"]) == (8, 1, 2)
    report = (out / "net.md").read_text()
    assert "| w2 b8 d1 t1 | 500 (3.4) | 7,000 (15.0) | 1,871 | 0 | **chosen** |" in report
    assert (out / "net.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "net.json").read_text())["chosen"] == {"workers": 2, "batch_size": 8, "max_batch_delay": 1, "threads": 1}

    code = archive_main(["--configs", str(configs), "tune", "net", "--from-json", str(recorded), "--p99-ms", "50", "--out", str(out)])
    assert code == 2  # by default a lone client may be at most 1.25x slower: nothing fits, the config is left as it was
    assert yaml.safe_load((configs / "net.yaml").read_text()) == written
    assert "no setting met p99 <= 50 ms at every level with a lone client's p50 within 1.25x (or +0.5 ms) of the best" in capsys.readouterr().err
