"""Everything that knows the layout of a ``.mar``: entry names, sums, manifest, model-config, version, signature.

    MAR-INF/MANIFEST.json     torch-model-archiver's manifest: model name, version, handler, files
    model-config.yaml         TorchServe's worker keys, then ``handler:`` (options), ``model:`` (how to
                              load it), ``register:`` (batching TorchServe cannot read from an archive)
                              and ``serveready:`` (the library version and handler class that built it)
    serveready_entry.py       the module TorchServe imports: checks SHA256SUMS, then imports the handler
    serveready/handlers/      this package, so a host without the library serves the archive
    SHA256SUMS                ``sha256sum`` lines for every other file

:class:`Archive` is the one public surface over a built archive (read it, check it, rewrite
it, sign it, unpack it); :func:`normalize` makes a fresh one reproducible and adds its sums.
A ``.mar`` rebuilds byte for byte: sorted entries, one timestamp (``SOURCE_DATE_EPOCH``, else
1980-01-01). :func:`unpacked_problems` is the check a worker runs before it imports anything
else from the archive: the entry module carries its source (standard library only).

The signature (``NAME.mar.sig`` beside the archive, Ed25519 over the archive's SHA-256) closes
the gap the sums leave: whoever can rewrite an archive can rewrite its sums, not its signature.

Only the standard library and PyYAML (``cryptography`` for signatures): this module travels
inside every archive, and the management tools import it without torch.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import inspect
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ArchiveError, ConfigError

#: The module TorchServe imports from every archive.
ENTRY_MODULE = "serveready_entry"
ENTRY_FILE = f"{ENTRY_MODULE}.py"
CONFIG_ENTRY = "model-config.yaml"
MANIFEST_ENTRY = "MAR-INF/MANIFEST.json"
SUMS_ENTRY = "SHA256SUMS"
#: The folder that carries this library's handler code.
LIBRARY_DIR = "serveready"
#: model-config.yaml's section of settings TorchServe cannot read from an archive (maxBatchDelay 0).
REGISTER_KEY = "register"
#: model-config.yaml's section saying which library version and handler class built the archive.
LIBRARY_KEY = "serveready"
SIGNATURE_SUFFIX = ".sig"
#: Names at an archive's root that belong to the archive itself.
RESERVED_NAMES = frozenset({LIBRARY_DIR, ENTRY_FILE, CONFIG_ENTRY, "MAR-INF", SUMS_ENTRY})
#: Requests TorchServe queues per model before it answers 503; its own default, 100, overflows at ~100 clients.
DEFAULT_JOB_QUEUE_SIZE = 1000
#: 1980-01-01, the earliest time a zip entry can carry
DEFAULT_EPOCH = 315532800


def build_time() -> datetime.datetime:
    """The one timestamp every archive carries: ``SOURCE_DATE_EPOCH`` (reproducible-builds.org), else 1980-01-01 UTC."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    try:
        epoch = max(int(value), DEFAULT_EPOCH) if value else DEFAULT_EPOCH
    except ValueError:
        raise ArchiveError(f"SOURCE_DATE_EPOCH must be seconds since 1970 (an integer), got {value!r}") from None
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc)


def sums_text(entries: dict[str, bytes]) -> str:
    """``sha256sum`` lines for ``entries``, sorted by name."""
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(entries.items()))


def normalize(path: Path) -> None:
    """Rewrite the archive at ``path`` in place: sorted entries, fixed times and modes, fixed ``createdOn``, ``SHA256SUMS``."""
    when = build_time()
    with zipfile.ZipFile(path) as mar:
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
    Path(path).write_bytes(buffer.getvalue())


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


# -- signatures ------------------------------------------------------------------


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ArchiveError("signed archives need the cryptography package: pip install 'serveready[sign]'") from None
    return serialization, ed25519


def generate_key(private: Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair: ``private`` (PEM, owner-only) and ``private.pub``; refuses to overwrite."""
    serialization, ed25519 = _crypto()
    private = Path(private)
    public = private.with_name(private.name + ".pub")
    for path in (private, public):
        if path.exists():
            raise ArchiveError(f"{path} exists: keys are never overwritten (move it away first)")
    private.parent.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


# -- one archive -------------------------------------------------------------------


class Archive:
    """A built ``.mar`` on disk: what it says, whether it is intact, and copies of it that say more.

    Example:
        archive = Archive("model_store/net.mar")
        archive.check(public_key=Path("keys/archive.pub"))   # ArchiveError naming what is wrong
        archive.version, archive.config["handler"]
        gpu = archive.retarget("gpu")                        # model_store/net.gpu.mar
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Archive({str(self.path)!r})"

    @property
    def name(self) -> str:
        """The model name it registers under by default: the file name up to its first dot."""
        return self.path.name.split(".")[0]

    # -- reading -------------------------------------------------------------------

    def read(self, entry: str) -> bytes | None:
        """One entry's bytes, or None when the archive has no such entry."""
        try:
            with zipfile.ZipFile(self.path) as mar:
                return mar.read(entry) if entry in mar.namelist() else None
        except (zipfile.BadZipFile, OSError) as err:
            raise ArchiveError(f"{self.path} is not a readable model archive: {err}") from None

    @property
    def manifest(self) -> dict[str, Any]:
        """``MAR-INF/MANIFEST.json``."""
        data = self.read(MANIFEST_ENTRY)
        try:
            manifest = json.loads(data) if data is not None else None
        except ValueError as err:
            raise ArchiveError(f"{self.path.name} has an unreadable {MANIFEST_ENTRY}: {err}") from None
        if not isinstance(manifest, dict):
            raise ArchiveError(f"{self.path.name} has no {MANIFEST_ENTRY}: not a model archive")
        return manifest

    @property
    def config(self) -> dict[str, Any]:
        """``model-config.yaml`` ({} when it has none)."""
        data = self.read(CONFIG_ENTRY)
        return parse_config(data, self.path.name) if data is not None else {}

    @property
    def version(self) -> str:
        """The model version the manifest says (TorchServe registers it under that)."""
        try:
            return str(self.manifest["model"]["modelVersion"])
        except (KeyError, TypeError) as err:
            raise ArchiveError(f"{self.path.name} has no model version in its {MANIFEST_ENTRY}: {err}") from None

    @property
    def device(self) -> str | None:
        """The ``deviceType`` its model-config says, if it says one."""
        return self.config.get("deviceType")

    @property
    def batch_size(self) -> int:
        """The batch size it is meant to serve with: its ``register:`` section's (what ``ts-manage register`` passes
        TorchServe, which reads no zero delay from an archive), else the model-config's ``batchSize``."""
        config = self.config
        register = config.get(REGISTER_KEY) if isinstance(config.get(REGISTER_KEY), dict) else {}
        return max(1, int(register.get("batchSize") or config.get("batchSize") or 1))

    @property
    def workers(self) -> tuple[int, int]:
        """Its ``minWorkers`` and ``maxWorkers`` (what another host makes processes or replicas of)."""
        config = self.config
        low = max(1, int(config.get("minWorkers") or 1))
        return low, max(low, int(config.get("maxWorkers") or low))

    # -- checking ------------------------------------------------------------------

    def problems(self) -> list[str]:
        """What is wrong with it against its SHA256SUMS (empty: every file is there, listed and unchanged)."""
        try:
            with zipfile.ZipFile(self.path) as mar, tempfile.TemporaryDirectory(prefix="verify-") as tmp:
                _extract(mar, Path(tmp))
                return unpacked_problems(tmp)
        except _Outside as err:
            return [str(err)]
        except (zipfile.BadZipFile, OSError) as err:
            return [f"not a readable .mar (zip) file: {err}"]

    @property
    def signature_path(self) -> Path:
        return self.path.with_name(self.path.name + SIGNATURE_SUFFIX)

    def signature_problems(self, public_key: Path) -> list[str]:
        """What is wrong with its signature against ``public_key`` (empty: signed by its private key, unchanged)."""
        serialization, ed25519 = _crypto()
        from cryptography.exceptions import InvalidSignature

        try:
            key = serialization.load_pem_public_key(Path(public_key).read_bytes())
        except (OSError, ValueError, TypeError) as err:
            return [f"{public_key} is not a readable public key: {err}"]
        if not isinstance(key, ed25519.Ed25519PublicKey):
            return [f"{public_key} is not an Ed25519 public key"]
        if not self.signature_path.is_file():
            return [f"it is not signed: no {self.signature_path.name} beside it (ts-archive sign)"]
        try:
            key.verify(base64.b64decode(self.signature_path.read_text().strip(), validate=True), _digest(self.path))
        except (InvalidSignature, ValueError):
            return [f"its signature {self.signature_path.name} does not match: the archive changed after it was signed, or another key signed it"]
        return []

    def check(self, public_key: Path | None = None, outcome: str = "refused") -> None:
        """Raise :class:`ArchiveError` unless every file matches SHA256SUMS (and the signature verifies with
        ``public_key``); ``outcome`` says what did not happen ("not registered")."""
        problems = self.problems()
        if problems:
            raise ArchiveError(refusal(self.path.name, problems, f"failed its integrity check, {outcome}"))
        if public_key is not None:
            problems = self.signature_problems(public_key)
            if problems:
                raise ArchiveError(f"{self.path.name} is refused, {outcome}: {'; '.join(problems)}")

    def sign(self, private: Path) -> Path:
        """Write its signature to ``NAME.mar.sig`` (base64); returns that path."""
        serialization, ed25519 = _crypto()
        try:
            key = serialization.load_pem_private_key(Path(private).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as err:
            raise ArchiveError(f"{private} is not a readable private key: {err}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ArchiveError(f"{private} is not an Ed25519 private key (ts-archive keygen makes one)")
        self.signature_path.write_text(base64.b64encode(key.sign(_digest(self.path))).decode() + "\n")
        return self.signature_path

    # -- using -----------------------------------------------------------------------

    def unpack(self, into: Path) -> Path:
        """Extract it into ``into`` (nothing may land outside) and check the files against SHA256SUMS there.

        Raises:
            ArchiveError: unreadable, an entry pointing outside, or a file that fails its sum.
        """
        into = Path(into)
        try:
            with zipfile.ZipFile(self.path) as mar:
                _extract(mar, into)
        except _Outside as err:
            raise ArchiveError(refusal(self.path.name, [str(err)], "failed its integrity check, refused")) from None
        except (zipfile.BadZipFile, OSError) as err:
            raise ArchiveError(f"{self.path} is not a readable model archive: {err}") from None
        problems = unpacked_problems(str(into))
        if problems:
            raise ArchiveError(refusal(self.path.name, problems, "failed its integrity check, refused"))
        return into

    def rewrite(self, target: Path, change: Callable[[dict[str, Any]], None]) -> Archive:
        """A copy at ``target`` with ``change`` applied to its model-config.yaml, and sums of its own.

        TorchServe's register call cannot set the device or handler options: an archive that
        says them can. This archive must pass its own check first, so a changed archive is
        never laundered into one that passes (a signature does not carry over: none is copied).
        """
        self.check(outcome="not rewritten")
        import yaml

        with zipfile.ZipFile(self.path) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
            for item in src.infolist():
                data = src.read(item)
                if item.filename == CONFIG_ENTRY:
                    config = parse_config(data, self.path.name)
                    change(config)
                    data = yaml.safe_dump(config, sort_keys=False).encode()
                dst.writestr(item, data)
        normalize(Path(target))
        return Archive(target)

    def retarget(self, device: str) -> Archive:
        """``<stem>.<device>.mar`` beside it, whose model-config says ``deviceType: device``.

        TorchServe's register call has no device parameter: the archive's model-config decides.
        """
        device = str(getattr(device, "value", device))
        return self.rewrite(self.path.with_name(f"{self.path.stem}.{device}.mar"), lambda config: config.update(deviceType=device))


def store_archives(store: str | Path, names: Any = ()) -> dict[str, Path]:
    """The ``.mar`` files of a model store by the name each serves under (its file name without ``.mar``, as
    ``torchserve --models name=name.mar`` names it); ``names`` picks some, each of which must be there."""
    folder = Path(store)
    if not folder.is_dir():
        raise ConfigError(f"model store {folder} is not a folder")
    found = {path.stem: path for path in sorted(folder.glob("*.mar"))}
    wanted = [n for n in names if n]
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ConfigError(f"no {', '.join(f'{n}.mar' for n in missing)} in {folder} (it holds: {', '.join(found) or 'no archives'})")
    if wanted:
        found = {n: found[n] for n in wanted}
    if not found:
        raise ConfigError(f"no .mar archives in {folder}: build some with ts-archive build (or make mar)")
    return found


def parse_config(data: bytes, where: str = "model-config.yaml") -> dict[str, Any]:
    """A model-config.yaml's mapping ({} for an empty file)."""
    import yaml

    try:
        config = yaml.safe_load(data)
    except yaml.YAMLError as err:
        raise ArchiveError(f"{where} has an unreadable {CONFIG_ENTRY}: {err}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ArchiveError(f"{where}: {CONFIG_ENTRY} must be a mapping, got {type(config).__name__}")
    return config


class _Outside(Exception):
    pass


def _extract(mar: zipfile.ZipFile, into: Path) -> None:
    root = into.resolve()
    for info in mar.infolist():
        if not (root / info.filename).resolve().is_relative_to(root):
            raise _Outside(f"entry {info.filename!r} points outside the archive")
    mar.extractall(into)
