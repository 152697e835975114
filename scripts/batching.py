"""No-wait batching for ``ts-server``: full batches of what is queued, and a lone request never waits.

TorchServe 0.12's ``Model.pollBatch`` takes the first queued job, then polls for more with the
model's ``maxBatchDelay``, and leaves the loop as soon as that delay is used up. With a delay of 0
it is used up after one extra job: batches never exceed 2, however many requests wait. With a
delay of 1 ms or more, a lone request waits that long for company that never comes.

The aggregator is not a plug-in point and upstream takes no changes, so ``ts-server`` patches one
instruction pair of the installed frontend's own ``Model.class`` (read from the wheel's
``model-server.jar``, never a copy of TorchServe's source): the ``if (maxDelay <= 0) break;`` of
``pollBatch``'s loop becomes a no-op. The loop then ends only when the batch is full or a poll
finds nothing: with delay 0 every poll is non-blocking (what is queued, up to ``batchSize``, no
wait), and with a delay D it still waits at most D ms, then tops the batch up with whatever is
already queued. Nothing else changes: a job taken is held and answered (or put back when its
worker dies) exactly as before.

The patched class goes into the server's run folder, which TorchServe's launcher puts first on
the frontend's classpath (``.``). It is used only when the instruction pattern is found exactly
once and a JVM of the same installation loaded and verified the patched class (cached per jar and
Java); otherwise the server runs with the stock aggregator and says why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

MODEL_CLASS = "org/pytorch/serve/wlm/Model.class"
METHOD = ("pollBatch", "(Ljava/lang/String;JLjava/util/Map;)V")

# lload <maxDelay>; lconst_0; lcmp; ifgt +6 (the loop's next round); goto <after the loop>
_LLOAD, _LCONST_0, _LCMP, _IFGT, _GOTO, _POP, _NOP = 0x16, 0x09, 0x94, 0x9D, 0xA7, 0x57, 0x00
_VERIFY_SOURCE = """public class Verify {
    public static void main(String[] args) throws Exception {
        Class<?> c = Class.forName("org.pytorch.serve.wlm.Model", false, Verify.class.getClassLoader());
        java.lang.invoke.MethodHandles.lookup().ensureInitialized(c);
        System.out.println(c.getProtectionDomain().getCodeSource().getLocation());
    }
}
"""


class PatchUnavailable(Exception):
    """Why the stock aggregator stays: the pattern is not there, or no JVM here verified the patch."""


@dataclass(frozen=True)
class Batching:
    """What a server runs with: ``no-wait`` (the patched class in its folder) or ``stock``, and why."""

    mode: str
    detail: str

    def __str__(self) -> str:
        return f"{self.mode} ({self.detail})"


def _constant_pool_end(data: bytes) -> tuple[int, dict[int, str]]:
    """Where the constant pool ends, and its UTF-8 entries by index."""
    count = struct.unpack_from(">H", data, 8)[0]
    at, index, utf8 = 10, 1, {}
    sizes = {3: 4, 4: 4, 5: 8, 6: 8, 7: 2, 8: 2, 9: 4, 10: 4, 11: 4, 12: 4, 15: 3, 16: 2, 17: 4, 18: 4, 19: 2, 20: 2}
    while index < count:
        tag = data[at]
        if tag == 1:
            length = struct.unpack_from(">H", data, at + 1)[0]
            utf8[index] = data[at + 3:at + 3 + length].decode("utf-8", "replace")
            at += 3 + length
        elif tag in sizes:
            at += 1 + sizes[tag]
        else:
            raise PatchUnavailable(f"unknown constant pool tag {tag}")
        index += 2 if tag in (5, 6) else 1
    return at, utf8


def _skip_members(data: bytes, at: int) -> int:
    count = struct.unpack_from(">H", data, at)[0]
    at += 2
    for _ in range(count):
        at += 6
        attributes = struct.unpack_from(">H", data, at)[0]
        at += 2
        for _ in range(attributes):
            at += 6 + struct.unpack_from(">I", data, at + 2)[0]
    return at


def method_code(data: bytes, name: str, descriptor: str) -> tuple[int, int]:
    """Offset and length of one method's bytecode in a class file."""
    if data[:4] != b"\xca\xfe\xba\xbe":
        raise PatchUnavailable("not a class file")
    at, utf8 = _constant_pool_end(data)
    at += 6 + 2 * struct.unpack_from(">H", data, at + 6)[0] + 2  # access, this, super, interfaces
    at = _skip_members(data, at)  # fields
    methods = struct.unpack_from(">H", data, at)[0]
    at += 2
    for _ in range(methods):
        name_index, descriptor_index, attributes = struct.unpack_from(">HHH", data, at + 2)
        at += 8
        for _ in range(attributes):
            attribute, length = struct.unpack_from(">HI", data, at)
            if utf8.get(name_index) == name and utf8.get(descriptor_index) == descriptor and utf8.get(attribute) == "Code":
                code_length = struct.unpack_from(">I", data, at + 10)[0]
                return at + 14, code_length
            at += 6 + length
    raise PatchUnavailable(f"no method {name}{descriptor}")


def patch_class(data: bytes) -> bytes:
    """``Model.class`` with ``pollBatch``'s "delay used up: stop" turned into a no-op (same length, same frames)."""
    start, length = method_code(data, *METHOD)
    code = data[start:start + length]
    found = [i for i in range(len(code) - 9)
             if code[i] == _LLOAD and code[i + 2] == _LCONST_0 and code[i + 3] == _LCMP and code[i + 4:i + 7] == bytes((_IFGT, 0, 6))
             and code[i + 7] == _GOTO]
    if len(found) != 1:
        raise PatchUnavailable(f"pollBatch's delay check found {len(found)} times, expected once: another TorchServe build")
    at = start + found[0] + 4
    # ifgt +6 -> pop, nop, nop (drop lcmp's result); goto -> nop x3: fall through to the loop's next round
    return data[:at] + bytes((_POP, _NOP, _NOP, _NOP, _NOP, _NOP)) + data[at + 6:]


def frontend_jar(python: str | None = None) -> Path:
    """The frontend a launcher runs: the ``ts/frontend/model-server.jar`` of this environment, or of ``python``'s."""
    import importlib.util

    if python is None:
        spec = importlib.util.find_spec("ts")
        if spec is None or not spec.submodule_search_locations:
            raise PatchUnavailable("TorchServe (the ts package) is not installed here")
        package = Path(next(iter(spec.submodule_search_locations)))
    else:
        code = "import importlib.util as u; s = u.find_spec('ts'); print(next(iter(s.submodule_search_locations)) if s else '')"
        found = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
        if found.returncode != 0 or not found.stdout.strip():
            raise PatchUnavailable(f"{python} has no TorchServe (the ts package)")
        package = Path(found.stdout.strip())
    jar = package / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise PatchUnavailable(f"no {jar}")
    return jar


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "serveready" / "batching"


def _java_tools(java: str | None) -> tuple[str, str]:
    runner = java or shutil.which("java")
    if runner is None:
        raise PatchUnavailable("no java to verify the patch with")
    compiler = Path(runner).resolve().with_name("javac")
    if not compiler.exists():
        raise PatchUnavailable(f"no javac beside {runner} to build the verifier")
    return str(Path(runner).resolve()), str(compiler)


def verified_patch(jar: Path, java: str | None = None) -> Path:
    """A folder holding the patched ``Model.class``, verified by this Java once and cached.

    Raises:
        PatchUnavailable: the pattern is not in this jar, or the JVM refused the patched class.
    """
    runner, compiler = _java_tools(java)
    digest = hashlib.sha256(jar.read_bytes() + runner.encode()).hexdigest()[:16]
    folder = _cache_root() / digest
    marker = folder / "VERIFIED"
    if marker.is_file():
        return folder / "classes"
    with zipfile.ZipFile(jar) as archive:
        patched = patch_class(archive.read(MODEL_CLASS))
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        work = Path(tmp)
        target = work / "classes" / MODEL_CLASS
        target.parent.mkdir(parents=True)
        target.write_bytes(patched)
        (work / "Verify.java").write_text(_VERIFY_SOURCE)
        built = subprocess.run([compiler, "-d", str(work / "verify"), str(work / "Verify.java")], capture_output=True, text=True, timeout=120)
        if built.returncode != 0:
            raise PatchUnavailable(f"javac could not build the verifier: {built.stderr.strip()[-300:]}")
        classpath = os.pathsep.join([str(work / "verify"), str(work / "classes"), str(jar.parent / "*")])
        ran = subprocess.run([runner, "-Xverify:all", "-cp", classpath, "Verify"], capture_output=True, text=True, timeout=120)
        if ran.returncode != 0 or str(work / "classes") not in ran.stdout:
            said = (ran.stderr or ran.stdout).strip().splitlines() or ["no output"]
            raise PatchUnavailable(f"the JVM refused the patched class: {said[0][:300]}")
        (work / "VERIFIED").write_text(ran.stdout)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(work, folder)
        work.mkdir()  # for TemporaryDirectory's clean-up
    return folder / "classes"


def probe(java: str | None = None, python: str | None = None) -> tuple[Batching, Path | None]:
    """What a ``ts-server`` here would run with, and the folder of the verified class when it is the no-wait one."""
    try:
        classes = verified_patch(frontend_jar(python), java)
    except (PatchUnavailable, OSError, subprocess.SubprocessError, zipfile.BadZipFile) as err:
        return Batching("stock", f"TorchServe's own aggregator: {err}"), None
    return Batching("no-wait", "a batch takes what is queued, up to batchSize, without waiting; maxBatchDelay still caps any wait"), classes


def install(run_dir: Path, java: str | None = None, python: str | None = None) -> Batching:
    """Put the verified patched class on the classpath of the server started from ``run_dir`` (whose frontend is
    ``python``'s TorchServe, by default this environment's), or say why not."""
    chosen, classes = probe(java, python)
    if classes is None:
        remove(run_dir)
        return chosen
    target = run_dir / MODEL_CLASS
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(classes / MODEL_CLASS, target)
    return chosen


def remove(run_dir: Path) -> Batching:
    """The stock aggregator for the server started from ``run_dir`` (its folder holds no patched class)."""
    (run_dir / MODEL_CLASS).unlink(missing_ok=True)
    return Batching("stock", "TorchServe's own aggregator, as asked")


__all__ = ["Batching", "PatchUnavailable", "frontend_jar", "install", "method_code", "patch_class", "probe", "remove", "verified_patch"]
