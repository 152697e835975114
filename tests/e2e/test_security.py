"""Keys and the gRPC APIs on a real TorchServe: expired keys renewed, refused ones explained, gRPC behind the key."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests

from serveready.scripts.client import Inference, Management, refresh_key
from serveready.scripts.runinfo import RunDir, TokenKind
from serveready.scripts.server import isolated, start, stop
from tests.e2e.test_serve import ts_manage

ROW = {"inputs": [0.5, 0, 0, 0, 0, 0, 0, 0, 0, 1]}


@pytest.fixture(scope="module")
def short_keys(net_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunDir]:
    """A server whose keys expire after 15 seconds (token_expiration_min=0.25: TorchServe reads it as a double)."""
    base = tmp_path_factory.mktemp("keys")
    (base / "store").mkdir()
    shutil.copy(net_archive, base / "store")
    run = start(dataclasses.replace(isolated(base / "run", base / "store"), token_expiration_min=0.25))
    try:
        assert ts_manage(run, "register", "net.mar", "--workers", "1").returncode == 0
        yield run
    finally:
        stop(run.path)


def _varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        out += bytes([low | (0x80 if n else 0)])
        if not n:
            return out


def _field(number: int, data: bytes) -> bytes:
    """One length-delimited protobuf field (strings, bytes, messages)."""
    return bytes([number << 3 | 2]) + _varint(len(data)) + data


def _grpc_port(run: RunDir, api: str) -> int:
    return int(run.properties()[f"grpc_{api}_port"])


def test_grpc_apis_refuse_calls_without_the_key(short_keys: RunDir) -> None:
    """TorchServe 0.12's gRPC APIs cannot be turned off; they do check the same keys (PERMISSION_DENIED)."""
    run = short_keys
    # PredictionsRequest {model_name = 1; input = 3 (map<string, bytes>)}, built by hand: no generated stubs needed
    request = _field(1, b"net") + _field(3, _field(1, b"data") + _field(2, json.dumps(ROW).encode()))
    channel = grpc.insecure_channel(f"127.0.0.1:{_grpc_port(run, 'inference')}")
    predict = channel.unary_unary("/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
                                  request_serializer=lambda b: b, response_deserializer=lambda b: b)
    for metadata in (None, [("authorization", "Bearer not-the-key")], [("authorization", f"Bearer {run.token(TokenKind.MANAGEMENT)}")]):
        with pytest.raises(grpc.RpcError) as refused:
            predict(request, metadata=metadata, timeout=30)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and "Token Authorization failed" in refused.value.details()
    key = refresh_key(run, TokenKind.INFERENCE)  # a fresh one: these keys live a minute
    answer = predict(request, metadata=[("authorization", f"Bearer {key}")], timeout=30)
    assert b'"predictions"' in answer
    management = grpc.insecure_channel(f"127.0.0.1:{_grpc_port(run, 'management')}")
    listing = management.unary_unary("/org.pytorch.serve.grpc.management.ManagementAPIsService/ListModels",
                                     request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as refused:
        listing(b"", timeout=30)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_expired_keys_are_renewed_by_the_tools(short_keys: RunDir) -> None:
    run = short_keys
    stale = {kind: run.token(kind) for kind in (TokenKind.MANAGEMENT, TokenKind.INFERENCE)}
    deadline = time.monotonic() + 90
    while requests.get(f"{run.management_url}/models", headers={"Authorization": f"Bearer {stale[TokenKind.MANAGEMENT]}"}, timeout=10).status_code != 400:
        assert time.monotonic() < deadline, "the management key never expired"
        time.sleep(5)
    # The inference key may be younger (the gRPC test renewed it): wait for it to expire too.
    while (expired := requests.post(f"{run.inference_url}/predictions/net", json=ROW, headers={"Authorization": f"Bearer {stale[TokenKind.INFERENCE]}"},
                                    timeout=10)).status_code == 200:
        assert time.monotonic() < deadline, "the inference key never expired"
        time.sleep(2)
    assert expired.status_code == 400 and "Token Authorization failed" in expired.text
    listed = ts_manage(run, "list")
    assert listed.returncode == 0 and '"net"' in listed.stdout, listed.stderr
    assert run.token(TokenKind.MANAGEMENT) != stale[TokenKind.MANAGEMENT]
    assert Inference.from_run(run).post("net", json.dumps(ROW).encode(), "application/json").status_code == 200
    assert run.token(TokenKind.INFERENCE) != stale[TokenKind.INFERENCE]
    info = subprocess.run([str(Path(sys.executable).with_name("ts-server")), "--run-dir", str(run.path), "info"], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and f"Bearer {run.token(TokenKind.INFERENCE)}" in info.stdout


def test_a_key_file_that_is_not_the_servers_says_what_to_do(short_keys: RunDir, tmp_path: Path) -> None:
    elsewhere = RunDir(tmp_path / "run")
    elsewhere.path.mkdir()
    shutil.copy(short_keys.config_file, elsewhere.config_file)
    elsewhere.key_file.write_text(json.dumps({k: {"key": "wrong"} for k in ("management", "inference", "API")}))
    done = ts_manage(elsewhere, "list")
    assert done.returncode == 1
    assert "refused the management key and its token API refused the API key in" in done.stderr
    assert "is " + str(elsewhere.path) + " the run folder of the server on that port?" in done.stderr


def test_a_server_that_is_down_says_what_to_do(short_keys: RunDir, tmp_path: Path) -> None:
    gone = RunDir(tmp_path / "run")
    gone.path.mkdir()
    properties = short_keys.config_file.read_text().replace(short_keys.management_url, "http://127.0.0.1:9")
    gone.config_file.write_text(properties)
    shutil.copy(short_keys.key_file, gone.key_file)
    done = ts_manage(gone, "list")
    assert done.returncode == 1 and "cannot reach TorchServe's management API at http://127.0.0.1:9: is the server running? (ts-server start)" in done.stderr
    assert isinstance(Management.from_run(short_keys).models(), dict)


def test_a_request_over_the_size_limit_gets_413_and_the_server_serves_on(short_keys: RunDir) -> None:
    limit = int(short_keys.properties()["max_request_size"])
    assert limit == 8 * 2**20
    api = Inference.from_run(short_keys)
    api.token = refresh_key(short_keys, TokenKind.INFERENCE)
    too_big = api.post("net", b'{"inputs": [' + b"0," * (limit // 2) + b"0]}", "application/json")
    assert too_big.status_code == 413
    assert api.post("net", json.dumps(ROW).encode(), "application/json").status_code == 200


def test_a_server_with_the_model_api_off_says_so(net_archive: Path, tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    shutil.copy(net_archive, tmp_path / "store")
    run = start(dataclasses.replace(isolated(tmp_path / "run", tmp_path / "store"), model_api=False))
    try:
        done = ts_manage(run, "register", "net.mar")
        assert done.returncode == 1
        assert "POST /models is not allowed by the server: its model API is off (enable_model_api=false" in done.stderr, done.stderr
    finally:
        stop(run.path)
