"""``make gpu-bundle`` (``python -m tools.gpu_bundle``): pack what `make gpu-check` needs for a GPU machine that has Python and torch
but no Java, no network and a small upload limit.

That is the kind of machine lent to some development sessions (its own torch with CUDA, 64 MiB
of upload). The bundle is one folder (default ``gpu-bundle/``):

- ``jre.tar.xz``: a Java runtime cut by ``jlink`` to the modules TorchServe 0.12 uses;
- ``site.tar.xz``: TorchServe, the model archiver, captum and this library, copied from this
  environment (exact versions, no download), TorchServe's 42 MB jar re-stored uncompressed so xz
  packs its classes together; plus ``fallback/``: small pure-Python packages the other machine
  may lack (requests, psutil, pytest, ...), installed there only where missing;
- ``model_store/``: the archives as built here (torch keeps state_dicts, ONNX files and
  ``torch.export`` programs loadable across these versions);
- ``data/``: the examples' held-out data files (``ts-gpu-check --data``: real inputs, not random ones);
- ``MANIFEST.json``: what is inside and where it came from.

``scripts/gpu_device_run.sh`` unpacks it on the other machine and runs the GPU tests and
``ts-gpu-check`` there (see docs/gpu.md).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from serveready.scripts.runinfo import ScriptError
from serveready.scripts.server import java_home

#: The Java modules TorchServe 0.12's frontend loads (java.desktop for java.beans, jdk.crypto.ec
#: for TLS, java.sql for its dependencies' drivers); measured by running it on the cut runtime.
JRE_MODULES = ("java.base", "java.logging", "java.management", "java.naming", "java.sql", "java.xml", "java.desktop",
               "jdk.unsupported", "java.net.http", "jdk.crypto.ec", "java.scripting", "jdk.management")

#: Always installed from the bundle: the serving stack at the versions the archives were built with.
CORE = ("torchserve", "torch-model-archiver", "captum")

#: Installed on the other machine only where its Python lacks them (name -> import name).
FALLBACK = {"requests": "requests", "urllib3": "urllib3", "idna": "idna", "certifi": "certifi",
            "charset-normalizer": "charset_normalizer", "psutil": "psutil", "packaging": "packaging",
            "tqdm": "tqdm", "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "Pygments": "pygments", "PyYAML": "yaml"}

#: pytest's own on Pythons below 3.11: bundled when this environment has them (a 3.11+ one does not).
FALLBACK_IF_INSTALLED = {"exceptiongroup": "exceptiongroup", "tomli": "tomli"}

#: What the `device` tool carries (the working tree and the carried folders together).
UPLOAD_LIMIT = 64 * 2**20

TS_JAR = "ts/frontend/model-server.jar"


def copy_distribution(name: str, site: Path) -> list[str]:
    """Copy an installed distribution's files (not its console scripts) into ``site``; returns them."""
    dist = importlib.metadata.distribution(name)
    copied = []
    for file in dist.files or []:
        if file.parts[0] == ".." or "__pycache__" in file.parts:
            continue
        source = Path(str(dist.locate_file(file)))
        if source.is_file():
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            copied.append(str(file))
    if not copied:
        raise ScriptError(f"{name} {dist.version} lists no files to copy (an editable install?)")
    return copied


def store_uncompressed(jar: Path) -> None:
    """Rewrite a jar with its entries stored, not deflated, so xz can compress across classes."""
    with zipfile.ZipFile(jar) as source:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as target:
            for info in source.infolist():
                data = source.read(info)
                info.compress_type = zipfile.ZIP_STORED
                target.writestr(info, data)
    jar.write_bytes(buffer.getvalue())


def install_wheel(wheel: Path, site: Path) -> None:
    """A pure-Python wheel is installed by unpacking it (this library's own has no scripts or data)."""
    with zipfile.ZipFile(wheel) as archive:
        if any(".data/" in n for n in archive.namelist()):
            raise ScriptError(f"{wheel.name} has a .data folder: install it with pip instead")
        archive.extractall(site)


def cut_jre(out: Path) -> str:
    """A Java runtime of JRE_MODULES from this machine's JDK; or, without jlink, the whole runtime."""
    home = _java_home()
    jlink = home / "bin" / "jlink"
    if jlink.is_file() and (home / "jmods").is_dir():
        subprocess.run([str(jlink), "--add-modules", ",".join(JRE_MODULES), "--strip-debug", "--no-header-files", "--no-man-pages",
                        "--compress=0", "--output", str(out)], check=True, stdout=subprocess.DEVNULL)
        return f"jlink from {home}"
    shutil.copytree(home, out, symlinks=True)
    return f"a copy of {home} (no jlink with jmods there)"


def _java_home() -> Path:
    home = java_home()  # None: TorchServe would run the `java` on PATH
    found = shutil.which("java")
    if home is None and found is None:
        raise ScriptError("no Java here to cut a runtime from: install a JDK 11+")
    return Path(home) if home else Path(found).resolve().parent.parent  # type: ignore[arg-type]


def pack(folder: Path, archive: Path, preset: int) -> None:
    with tarfile.open(archive, "w:xz", preset=preset) as tar:
        tar.add(folder, arcname=folder.name)


def build_bundle(model_store: Path, wheel: Path, out: Path, preset: int = 9, say: Callable[[str], None] = print,
                 data: Iterable[Path] = ()) -> dict[str, object]:
    """Write the bundle to ``out`` (replacing it) and return its manifest; ``data``: files ts-gpu-check takes inputs from."""
    data = [Path(p) for p in data]
    archives = sorted(model_store.glob("*.mar"))
    if not archives:
        raise ScriptError(f"no .mar in {model_store}: make mar")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    versions = {name: importlib.metadata.version(name) for name in (*CORE, *FALLBACK)}
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as tmp:
        scratch = Path(tmp)
        started = time.monotonic()
        how = cut_jre(scratch / "jre")
        pack(scratch / "jre", out / "jre.tar.xz", preset)
        say(f"jre.tar.xz: {_mib(out / 'jre.tar.xz')} ({how}; {time.monotonic() - started:.0f} s)")

        started = time.monotonic()
        site = scratch / "site"
        for name in CORE:
            copy_distribution(name, site)
        install_wheel(wheel, site)
        store_uncompressed(site / TS_JAR)
        fallback = {**FALLBACK, **{n: m for n, m in FALLBACK_IF_INSTALLED.items() if _installed(n)}}
        for name in fallback:
            copy_distribution(name, site / "fallback" / name)
        (site / "fallback" / "FALLBACK.json").write_text(json.dumps(fallback, indent=1) + "\n")
        pack(site, out / "site.tar.xz", preset)
        say(f"site.tar.xz: {_mib(out / 'site.tar.xz')} ({', '.join(CORE)}, {wheel.name}, fallback {len(fallback)}; "
            f"{time.monotonic() - started:.0f} s)")
        if len(fallback) == len(FALLBACK):
            say(f"note: no {' or '.join(FALLBACK_IF_INSTALLED)} here (Python {sys.version_info.major}.{sys.version_info.minor}): "
                "a Python below 3.11 without pytest there cannot run the GPU unit tests; ts-gpu-check runs all the same")

    shutil.copytree(model_store, out / "model_store", ignore=shutil.ignore_patterns("*.tmp"))
    say(f"model_store/: {_mib(*(out / 'model_store').iterdir())} ({len(archives)} archives)")
    if data:
        (out / "data").mkdir()
        for path in data:
            shutil.copy2(path, out / "data" / path.name)
        say(f"data/: {_mib(*(out / 'data').iterdir())} (held-out inputs for ts-gpu-check: {', '.join(p.name for p in data)})")
    manifest: dict[str, object] = {
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0], "torch": importlib.metadata.version("torch"), "serveready": wheel.name,
        "versions": versions, "jre_modules": list(JRE_MODULES), "archives": [a.name for a in archives],
        "bytes": sum(f.stat().st_size for f in _files(out))}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = int(manifest["bytes"])  # type: ignore[call-overload]
    say(f"{out}: {total / 2**20:.1f} MiB in all")
    if total > UPLOAD_LIMIT - 4 * 2**20:
        say(f"warning: over {UPLOAD_LIMIT // 2**20 - 4} MiB: with the working tree it may not fit a {UPLOAD_LIMIT // 2**20} MiB upload; "
            "bundle fewer archives (--model-store a folder with a subset)")
    return manifest


def _newer_sources(wheel: Path) -> bool:
    """In a checkout: has any of this library's Python files changed since ``wheel`` was built?"""
    built = wheel.stat().st_mtime
    return any(f.stat().st_mtime > built for folder in ("serveready", "handlers", "archiver", "scripts") for f in Path(folder).rglob("*.py"))


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _files(folder: Path) -> Iterable[Path]:
    return (f for f in folder.rglob("*") if f.is_file())


def _mib(*paths: Path) -> str:
    return f"{sum(p.stat().st_size for p in paths) / 2**20:.1f} MiB"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--wheel", type=Path, help="this library's wheel (default: the newest dist/serveready-*.whl; make wheel)")
    parser.add_argument("--out", type=Path, default=Path("gpu-bundle"))
    parser.add_argument("--data", type=Path, nargs="*", help="data files for ts-gpu-check --data (default: examples/*/data/*.pt)")
    parser.add_argument("--preset", type=int, default=9, choices=range(10), metavar="0-9", help="xz level (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        wheel = args.wheel or max(Path("dist").glob("serveready-*.whl"), key=lambda p: p.stat().st_mtime, default=None)
        if wheel is None or not wheel.is_file():
            raise ScriptError("no serveready wheel: make wheel (or --wheel PATH)")
        if args.wheel is None and _newer_sources(wheel):
            raise ScriptError(f"{wheel} is older than the sources here: make gpu-bundle (it rebuilds the wheel), or --wheel PATH")
        data = args.data if args.data is not None else sorted(Path("examples").glob("*/data/*.pt"))
        build_bundle(args.model_store, wheel, args.out, args.preset, say=lambda line: print(line, file=sys.stderr, flush=True), data=data)
    except ScriptError as err:
        print(f"gpu-bundle: error: {err.message}", file=sys.stderr)
        return 1
    except (subprocess.CalledProcessError, OSError, importlib.metadata.PackageNotFoundError) as err:
        print(f"gpu-bundle: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
