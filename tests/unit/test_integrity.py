"""Archives that rebuild byte for byte, carry SHA-256 sums, and refuse to load when changed."""

from __future__ import annotations

import hashlib
import importlib
import io
import pickle
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from serveready.archiver import ModelSpec, build
from serveready.handlers import ModelLoadError
from serveready.handlers.archive import ENTRY_MODULE, SUMS_ENTRY, Archive
from serveready.scripts.archive import main as ts_archive
from tests.conftest import repack, served, unpack


def verify(archive: Path) -> list[str]:
    return Archive(archive).problems()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_same_inputs_build_the_same_bytes(net_spec: ModelSpec, net_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    again = build(net_spec, tmp_path / "again")
    assert _sha(again) == _sha(net_archive)
    with zipfile.ZipFile(again) as mar:
        infos = mar.infolist()
        assert [i.filename for i in infos] == sorted(i.filename for i in infos)
        assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
        assert b'"createdOn": "01/01/1980 00:00:00"' in mar.read("MAR-INF/MANIFEST.json")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1790000000")  # 2026-09-21
    dated = build(net_spec, tmp_path / "dated")
    with zipfile.ZipFile(dated) as mar:
        assert {i.date_time for i in mar.infolist()} == {(2026, 9, 21, 14, 13, 20)}
        assert b'"createdOn": "21/09/2026 14:13:20"' in mar.read("MAR-INF/MANIFEST.json")


def test_sums_list_every_other_file_in_sha256sum_format(net_archive: Path, tmp_path: Path) -> None:
    folder = unpack(net_archive, tmp_path / "net")
    lines = (folder / SUMS_ENTRY).read_text().splitlines()
    listed = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in lines}
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {SUMS_ENTRY}
    assert set(listed) == files
    assert all(hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest for name, digest in listed.items())
    assert verify(net_archive) == []


def _flip_weights(entries: dict[str, bytes]) -> None:
    data = bytearray(entries["net.pt"])
    data[-40] ^= 1
    entries["net.pt"] = bytes(data)


@pytest.mark.parametrize(("change", "expected"), [
    (_flip_weights, "net.pt does not match its SHA-256 in SHA256SUMS"),
    (lambda e: e.pop("net.py"), "net.py is listed in SHA256SUMS but missing"),
    (lambda e: e.update({"torch.py": b"raise SystemExit"}), "torch.py is not listed in SHA256SUMS"),
    (lambda e: e.pop(SUMS_ENTRY), "it has no SHA256SUMS"),
    (lambda e: e.update({SUMS_ENTRY: b"not a sum\n"}), "SHA256SUMS line 1 is not '<sha256>  <file>'"),
])
def test_verify_names_what_was_changed_after_the_build(net_archive: Path, tmp_path: Path, change, expected: str) -> None:  # noqa: ANN001
    tampered = repack(net_archive, tmp_path / "tampered.mar", change, resum=False)
    assert any(p.startswith(expected) for p in verify(tampered)), verify(tampered)
    assert ts_archive(["verify", str(net_archive), str(tampered)]) == 1


def test_verify_refuses_what_is_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mar"
    junk.write_bytes(b"PK not really")
    assert verify(junk)[0].startswith("not a readable .mar (zip) file")
    escape = tmp_path / "escape.mar"
    with zipfile.ZipFile(escape, "w") as mar:
        mar.writestr("../outside.py", "x = 1")
    assert verify(escape) == ["entry '../outside.py' points outside the archive"]
    assert not (tmp_path / "outside.py").exists()


def _import_entry(folder: Path) -> None:
    """Import the archive's entry module the way TorchServe's worker does: its folder first on sys.path."""
    sys.path.insert(0, str(folder))
    try:
        sys.modules.pop(ENTRY_MODULE, None)
        importlib.import_module(ENTRY_MODULE)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(ENTRY_MODULE, None)


def test_the_worker_checks_every_file_before_importing_any(net_archive: Path, tmp_path: Path) -> None:
    folder = unpack(net_archive, tmp_path / "ok")
    _import_entry(folder)  # untouched: imports
    folder = unpack(repack(net_archive, tmp_path / "t.mar", _flip_weights, resum=False), tmp_path / "tampered")
    (folder / "serveready" / "handlers" / "tabular.py").write_text("raise SystemExit('archived code ran')\n")
    with pytest.raises(RuntimeError, match="this archive failed its integrity check, refusing to load it: net.pt does not match") as err:
        _import_entry(folder)
    assert "serveready/handlers/tabular.py does not match" in str(err.value)


class _Touch:
    """Unpickled, this creates a file: what a hostile weights file does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.path,))


def malicious_weights(marker: Path) -> bytes:
    """A file torch.save wrote (zip with data.pkl), as a real .pt would be."""
    buffer = io.BytesIO()
    torch.save({"fc1.weight": _Touch(marker)}, buffer)
    return buffer.getvalue()


def test_a_malicious_pickle_as_weights_is_refused_and_never_runs(net_archive: Path, tmp_path: Path) -> None:
    """Consistent sums (its builder was the attacker): weights_only loading must still refuse it."""
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(io.BytesIO(malicious_weights(tmp_path / "proof"))) as saved:  # unpickled as an unsafe torch load would
        pickle.loads(saved.read(next(n for n in saved.namelist() if n.endswith("data.pkl"))))
    assert (tmp_path / "proof").exists()  # the payload does run when unpickled
    hostile = repack(net_archive, tmp_path / "hostile.mar", lambda e: e.update({"net.pt": malicious_weights(marker)}))
    assert verify(hostile) == []
    folder = unpack(hostile, tmp_path / "hostile")
    with pytest.raises(ModelLoadError, match="net.pt is not a loadable state_dict"):
        served(folder, 1)
    assert not marker.exists()


def test_signed_archives_verify_and_changed_or_foreign_ones_do_not(net_archive: Path, tmp_path: Path) -> None:
    import shutil

    from serveready.handlers.archive import generate_key
    from serveready.handlers.errors import ArchiveError

    private, public = generate_key(tmp_path / "keys" / "archive")
    assert private.stat().st_mode & 0o777 == 0o600 and public.name == "archive.pub"
    with pytest.raises(ArchiveError, match="exists: keys are never overwritten"):
        generate_key(private)
    archive = Archive(shutil.copy(net_archive, tmp_path / "net.mar"))
    assert archive.signature_problems(public) == ["it is not signed: no net.mar.sig beside it (ts-archive sign)"]
    assert archive.sign(private) == tmp_path / "net.mar.sig"
    assert archive.signature_problems(public) == []
    archive.check(public)  # raises nothing
    assert ts_archive(["verify", str(archive.path), "--public-key", str(public)]) == 0
    _, other = generate_key(tmp_path / "keys" / "other")
    assert "does not match" in archive.signature_problems(other)[0]
    with pytest.raises(ArchiveError, match="net.mar is refused, not loaded: its signature net.mar.sig does not match"):
        archive.check(other, outcome="not loaded")
    repack(net_archive, archive.path, _flip_weights)  # changed and re-summed, as an attacker would: the signature still catches it
    assert archive.problems() == [] and "does not match" in archive.signature_problems(public)[0]
    assert ts_archive(["verify", str(archive.path), "--public-key", str(public)]) == 1
