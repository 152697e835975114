"""Archives that rebuild byte for byte and say what they hold: fixed order and times, SHA-256 sums.

torch-model-archiver stamps every file with the time of the build and the manifest with
``createdOn``: the same inputs gave different bytes. :func:`normalize` rewrites a fresh
archive with sorted entries, one timestamp (``SOURCE_DATE_EPOCH``, else 1980-01-01) and a
``SHA256SUMS`` entry (``sha256sum -c`` format) listing every other file.

:func:`unpacked_problems` is the check a worker runs before it imports anything else from the
archive: the generated entry module carries its source (standard library only), so one
function serves the worker and ``ts-archive verify``.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

from .errors import ArchiverError

SUMS_ENTRY = "SHA256SUMS"
MANIFEST_ENTRY = "MAR-INF/MANIFEST.json"
#: 1980-01-01, the earliest time a zip entry can carry
DEFAULT_EPOCH = 315532800


def build_time() -> datetime.datetime:
    """The one timestamp every archive carries: ``SOURCE_DATE_EPOCH`` (reproducible-builds.org), else 1980-01-01 UTC."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    try:
        epoch = max(int(value), DEFAULT_EPOCH) if value else DEFAULT_EPOCH
    except ValueError:
        raise ArchiverError(f"SOURCE_DATE_EPOCH must be seconds since 1970 (an integer), got {value!r}") from None
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc)


def sums_text(entries: dict[str, bytes]) -> str:
    """``sha256sum`` lines for ``entries``, sorted by name."""
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(entries.items()))


def normalize(archive: Path) -> None:
    """Rewrite ``archive`` in place: sorted entries, fixed times and modes, fixed ``createdOn``, ``SHA256SUMS``."""
    when = build_time()
    with zipfile.ZipFile(archive) as mar:
        entries = {info.filename: mar.read(info) for info in mar.infolist() if not info.is_dir() and info.filename != SUMS_ENTRY}
    if MANIFEST_ENTRY in entries:
        manifest = json.loads(entries[MANIFEST_ENTRY])
        # torch-model-archiver's format for it, at the build time every entry carries
        manifest["createdOn"] = when.strftime("%d/%m/%Y %H:%M:%S")
        entries[MANIFEST_ENTRY] = (json.dumps(manifest, indent=2) + "\n").encode()
    entries[SUMS_ENTRY] = sums_text(entries).encode()
    stamp = when.timetuple()[:6]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as out:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, so the mode below is read
            info.external_attr = 0o644 << 16
            out.writestr(info, entries[name], compresslevel=6)
    archive.write_bytes(buffer.getvalue())


def refusal(archive: str, problems: list[str], outcome: str = "failed its integrity check") -> str:
    """One line for an archive refused over ``problems``, saying the fix once."""
    fix = "" if any("ts-archive build" in p for p in problems) else "; rebuild it with ts-archive build"
    return f"{archive} {outcome}: {'; '.join(problems[:5])}{fix}"


def unpacked_problems(root):  # noqa: ANN001, ANN201 -- copied into every archive's entry module, no annotations imports there
    """What is wrong with an unpacked archive at ``root`` against its SHA256SUMS (empty: nothing).

    Files listed must be there with their digest; files not listed must not be there
    (Python's own __pycache__ excepted: the worker writes those).
    """
    import hashlib
    import os

    sums = os.path.join(root, "SHA256SUMS")
    if not os.path.isfile(sums):
        return ["it has no SHA256SUMS (built before archives carried them, or by hand): rebuild it with ts-archive build"]
    problems, listed = [], set()
    with open(sums, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            digest, sep, name = line.rstrip("\n").partition("  ")
            if not sep or len(digest) != 64 or not name or name.startswith("/") or ".." in name.split("/"):
                return [f"SHA256SUMS line {number} is not '<sha256>  <file>'"]
            listed.add(name)
            path = os.path.join(root, *name.split("/"))
            if not os.path.isfile(path):
                problems.append(f"{name} is listed in SHA256SUMS but missing")
                continue
            h = hashlib.sha256()
            with open(path, "rb") as data:
                for chunk in iter(lambda: data.read(1 << 20), b""):  # noqa: B023 -- used at once
                    h.update(chunk)
            if h.hexdigest() != digest:
                problems.append(f"{name} does not match its SHA-256 in SHA256SUMS")
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for file in files:
            name = os.path.relpath(os.path.join(folder, file), root).replace(os.sep, "/")
            if name not in listed and name != "SHA256SUMS":
                problems.append(f"{name} is not listed in SHA256SUMS")
    return problems


def check_source() -> str:
    """The source of :func:`unpacked_problems`, for the generated entry module."""
    return inspect.getsource(unpacked_problems)


def verify(archive: Path) -> list[str]:
    """What is wrong with ``archive`` (empty: every file is there, listed and unchanged)."""
    try:
        with zipfile.ZipFile(archive) as mar, tempfile.TemporaryDirectory(prefix="verify-") as tmp:
            for info in mar.infolist():
                target = Path(tmp, info.filename).resolve()
                if not target.is_relative_to(Path(tmp).resolve()):
                    return [f"entry {info.filename!r} points outside the archive"]
            mar.extractall(tmp)
            return unpacked_problems(tmp)
    except (zipfile.BadZipFile, OSError) as err:
        return [f"not a readable .mar (zip) file: {err}"]
