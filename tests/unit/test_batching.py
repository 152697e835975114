"""The no-wait aggregator patch (scripts/batching.py) against the installed TorchServe frontend's own class."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from serveready.scripts import batching


@pytest.fixture(scope="module")
def stock_class() -> bytes:
    with zipfile.ZipFile(batching.frontend_jar()) as jar:
        return jar.read(batching.MODEL_CLASS)


def test_the_patch_changes_six_bytes_of_poll_batch_and_nothing_else(stock_class: bytes) -> None:
    patched = batching.patch_class(stock_class)
    start, length = batching.method_code(stock_class, *batching.METHOD)
    changed = [i for i, (a, b) in enumerate(zip(stock_class, patched, strict=True)) if a != b]
    at = start + stock_class[start:start + length].index(bytes((0x94, 0x9D, 0, 6, 0xA7))) + 1  # after lcmp: `if (maxDelay <= 0) break;`
    assert len(patched) == len(stock_class) and changed and set(changed) <= set(range(at, at + 6))  # that check, and nothing else
    assert patched[at:at + 6] == bytes((0x57, 0, 0, 0, 0, 0))  # pop lcmp's result, then nops: fall through to the next poll


def test_another_build_is_left_stock(stock_class: bytes) -> None:
    with pytest.raises(batching.PatchUnavailable, match="found 0 times"):
        batching.patch_class(batching.patch_class(stock_class))  # no pattern left: an already patched (or other) build
    with pytest.raises(batching.PatchUnavailable, match="not a class file"):
        batching.method_code(b"PK\x03\x04", *batching.METHOD)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if shutil.which("java") is None or not Path(shutil.which("java")).resolve().with_name("javac").exists():
        pytest.skip("needs a JDK (java and javac)")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_a_server_folder_gets_the_verified_class(cache: Path) -> None:
    chosen = batching.install(cache / "run")
    assert chosen.mode == "no-wait", chosen
    assert (cache / "run" / batching.MODEL_CLASS).read_bytes() == batching.patch_class(zipfile.ZipFile(batching.frontend_jar()).read(batching.MODEL_CLASS))
    assert batching.remove(cache / "run").mode == "stock" and not (cache / "run" / batching.MODEL_CLASS).exists()


def test_a_class_the_jvm_refuses_leaves_the_server_stock(cache: Path, stock_class: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    def unbalanced(data: bytes) -> bytes:  # nops only: lcmp's int stays on the stack at the loop's head, which the verifier rejects
        start, _ = batching.method_code(data, *batching.METHOD)
        at = start + data[start:].index(bytes((0x94, 0x9D, 0, 6))) + 1
        return data[:at] + bytes(6) + data[at + 6:]

    monkeypatch.setattr(batching, "patch_class", unbalanced)
    (cache / "run" / "org").mkdir(parents=True)
    chosen = batching.install(cache / "run")
    assert chosen.mode == "stock" and "the JVM refused the patched class" in chosen.detail and "VerifyError" in chosen.detail, chosen
    assert not (cache / "run" / batching.MODEL_CLASS).exists()
