"""serveready.hosting, what the KServe and Ray hosts share: routes, the store, keys, limits, and the no-wait batcher."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from serveready import hosting
from serveready.handlers.errors import ConfigError
from serveready.handlers.host import Answer


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/predictions/net", hosting.Route("net", "predict")),
        ("/predictions/net/1.0", hosting.Route("net", "predict")),
        ("/explanations/digits", hosting.Route("digits", "explain")),
        ("/v1/models/sentiment:predict", hosting.Route("sentiment", "predict")),
        ("/v1/models/sentiment:explain", hosting.Route("sentiment", "explain")),
        ("/v2/models/net/infer", hosting.Route("net", "predict")),
        ("/v2/models/net/versions/2/infer", hosting.Route("net", "predict")),
        ("/v2/models/net", None),
        ("/v2/models/net/ready", None),
        ("/predictions/", None),
        ("/v1/models/net", None),
    ],
)
def test_routes_name_the_model_and_the_verb(path: str, expected: hosting.Route | None) -> None:
    assert hosting.route(path) == expected


def test_open_routes_are_health_readiness_and_metrics_only() -> None:
    assert all(hosting.is_open(p) for p in ("/v2/health/live", "/v2/health/ready", "/v2/models/net/ready", "/metrics", "/v1/models/net"))
    assert not any(hosting.is_open(p) for p in ("/ping", "/predictions/net", "/v2/models/net", "/v2/models/net/infer", "/v1/models/net:predict"))


def test_the_store_lists_archives_by_name_and_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a folder"):
        hosting.archives(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no .mar archives in"):
        hosting.archives(tmp_path)
    for name in ("b", "a"):
        (tmp_path / f"{name}.mar").write_bytes(b"")
    assert list(hosting.archives(tmp_path)) == ["a", "b"]
    assert list(hosting.archives(tmp_path, ["b"])) == ["b"]
    with pytest.raises(ConfigError, match=r"no c\.mar in .* \(it holds: a, b\)"):
        hosting.archives(tmp_path, ["b", "c"])


def test_keys_are_bearer_tokens_compared_whole() -> None:
    assert hosting.key_matches({}, None)
    assert hosting.key_matches({"authorization": "Bearer k"}, "k") and hosting.key_matches({"Authorization": "bearer k"}, "k")
    assert not any(hosting.key_matches(h, "k") for h in ({}, {"authorization": "Bearer kk"}, {"authorization": "k"}, {"authorization": "Basic k"}))
    refused = hosting.unauthorized()
    assert refused.status == 401 and json.loads(refused.body)["type"] == "InvalidKeyException"


def test_errors_have_torchserves_shape() -> None:
    for answer, status in ((hosting.too_large(9_000_000), 413), (hosting.model_not_found("x"), 404)):
        document = json.loads(answer.body)
        assert answer.status == status == document["code"] and set(document) == {"code", "type", "message"}
    assert json.loads(hosting.model_not_found("x").body)["message"] == "Model not found: x"
    assert "9,000,000 bytes, more than the limit of 8,388,608" in hosting.too_large(9_000_000).reason


class _SlowModel:
    """predict_batch records its batch sizes and takes 50 ms, like a model that computes."""

    name = "slow"

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.threads: set[str] = set()

    def predict_batch(self, requests: list[tuple[Any, ...]]) -> list[Answer]:
        self.sizes.append(len(requests))
        self.threads.add(threading.current_thread().name)
        time.sleep(0.05)
        return [Answer(200, "application/json", body) for body, _, _ in requests]

    def close(self) -> None:
        pass


def test_the_batcher_runs_a_lone_request_at_once_and_a_crowd_in_full_batches() -> None:
    model = _SlowModel()
    batcher = hosting.Batcher(model, size=4)  # type: ignore[arg-type]

    async def scenario() -> list[list[bytes]]:
        alone = await batcher.predict(b"0", "application/json", {})
        crowd = await asyncio.gather(*(batcher.predict(str(i).encode(), None, {}) for i in range(1, 10)))
        return [[alone.body], [a.body for a in crowd]]

    alone, crowd = asyncio.run(scenario())
    batcher.close()
    assert alone == [b"0"] and crowd == [str(i).encode() for i in range(1, 10)]  # each request gets its own answer, in order
    # the lone one alone, at once; the crowd, queued together, in full batches (and what is left over)
    assert model.sizes == [1, 4, 4, 1], model.sizes
    assert len(model.threads) == 1 and threading.current_thread().name not in model.threads  # off the event loop, one thread


def test_a_failing_batch_answers_500_and_the_batcher_lives_on() -> None:
    class Broken(_SlowModel):
        def predict_batch(self, requests: list[tuple[Any, ...]]) -> list[Answer]:
            if requests[0][0] == b"boom":
                raise RuntimeError("out of memory")
            return super().predict_batch(requests)

    batcher = hosting.Batcher(Broken(), size=2)  # type: ignore[arg-type]

    async def scenario() -> tuple[Answer, Answer]:
        return await batcher.predict(b"boom", None, {}), await batcher.predict(b"fine", None, {})

    failed, fine = asyncio.run(scenario())
    batcher.close()
    assert failed.status == 500 and "out of memory" in json.loads(failed.body)["message"]
    assert (fine.status, fine.body) == (200, b"fine")


def test_a_workers_command_line_is_the_servers_own_on_the_shared_socket() -> None:
    from serveready import kserve

    args = kserve.parser().parse_args(["--model_dir", "store", "--model_name", "net", "--model_name", "digits", "--http_port", "9000",
                                       "--grpc_port", "9001", "--enable_grpc", "false", "--workers", "3", "--key_file", "k.txt", "--max_request_size", "1024"])
    command = kserve.worker_argv(args, 7)
    assert command[1:3] == ["-m", "serveready.kserve"]
    again = kserve.parser().parse_args(command[3:])
    assert again.http_fd == 7 and again.workers == 1  # one process each, on the inherited socket
    assert {k: v for k, v in vars(again).items() if k not in ("http_fd", "workers")} == {k: v for k, v in vars(args).items() if k not in ("http_fd", "workers")}
    assert kserve.main(["--model_dir", "store", "--workers", "0"]) == 2


def test_workers_that_keep_failing_at_start_stop_the_supervisor(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import sys

    from serveready import kserve, workers

    monkeypatch.setattr(workers, "RESTART_PAUSE_S", 0.05)
    sock = workers.listening_socket("127.0.0.1", 0)
    supervisor = workers.Supervisor(lambda fd: [sys.executable, "-c", "raise SystemExit(3)"], sock, 2)
    assert supervisor.run() == 1 and supervisor.early_exits == workers.EARLY_EXITS  # not a restart loop forever
    assert kserve.main(["--model_dir", "/nonexistent", "--workers", "2"]) != 0  # a wrong store: refused before any copy starts
    assert "model store /nonexistent is not a folder" in capsys.readouterr().err
