"""Broken, tampered and hostile archives on a real TorchServe: refused fast with the reason; the rest serves on."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from serveready.scripts.client import Management
from serveready.scripts.runinfo import RunDir, ScriptError
from tests.conftest import repack
from tests.e2e.conftest import Api, serving
from tests.e2e.test_serve import ts_manage
from tests.unit.test_integrity import _flip_weights, malicious_weights

ROW = '{"inputs": [0.5, 0, 0, 0, 0, 0, 0, 0, 0, 1]}'


@pytest.fixture(scope="module")
def live(net_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunDir]:
    with serving([net_archive], tmp_path_factory.mktemp("trust")) as run:
        assert ts_manage(run, "register", "net.mar").returncode == 0
        yield run


def _wrong_shapes(entries: dict[str, bytes]) -> None:
    buffer = io.BytesIO()
    torch.save({"fc1.weight": torch.zeros(20, 12), "fc1.bias": torch.zeros(20), "fc2.weight": torch.zeros(1, 20), "fc2.bias": torch.zeros(1)}, buffer)
    entries["net.pt"] = buffer.getvalue()


def _import_error(entries: dict[str, bytes]) -> None:
    entries["serveready/handlers/tabular.py"] += b"\nimport no_such_module_here\n"


def _syntax_error(entries: dict[str, bytes]) -> None:
    entries["serveready/handlers/tabular.py"] += b"\ndef broken(:\n"


def _no_weights(entries: dict[str, bytes]) -> None:
    del entries["net.pt"]


BROKEN = {
    "no_weights": (_no_weights, "net.pt does not exist"),
    "wrong_shapes": (_wrong_shapes, "does not fit"),
    "import_error": (_import_error, "cannot be imported: ModuleNotFoundError: No module named 'no_such_module_here'"),
    "syntax_error": (_syntax_error, "cannot be imported: SyntaxError: invalid syntax (tabular.py, line"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_archive_is_refused_with_its_reason_and_the_rest_serves_on(live: RunDir, kind: str) -> None:
    change, reason = BROKEN[kind]
    repack(live.model_store / "net.mar", live.model_store / f"{kind}.mar", change)
    done = ts_manage(live, "register", f"{kind}.mar")
    assert done.returncode == 1 and f"{kind!r} is not registered; the worker said: " in done.stderr and reason in done.stderr, done.stderr
    assert f'"{kind}"' not in ts_manage(live, "list").stdout
    assert Api(live).predict("net", ROW).status_code == 200


def test_a_tampered_archive_is_refused_before_and_by_the_worker(live: RunDir) -> None:
    repack(live.model_store / "net.mar", live.model_store / "tampered.mar", _flip_weights, resum=False)
    done = ts_manage(live, "register", "tampered.mar")
    assert done.returncode == 1
    assert "tampered.mar failed its integrity check, not registered: net.pt does not match its SHA-256 in SHA256SUMS" in done.stderr
    # Registered behind ts-manage's back (curl), the worker itself refuses it.
    management = Management.from_run(live)
    with pytest.raises(ScriptError, match="Failed to start workers"):
        management.call("POST", "/models", url="tampered.mar", model_name="tampered", initial_workers=1, synchronous="true")
    log = (live.log_dir / "model_log.log").read_text()
    assert "this archive failed its integrity check, refusing to load it: net.pt does not match its SHA-256 in SHA256SUMS" in log
    management.unregister("tampered")
    assert Api(live).predict("net", ROW).status_code == 200


def test_a_malicious_pickle_never_runs_in_the_worker(live: RunDir, tmp_path: Path) -> None:
    marker = tmp_path / "pwned-by-weights"
    repack(live.model_store / "net.mar", live.model_store / "hostile.mar", lambda e: e.update({"net.pt": malicious_weights(marker)}))
    done = ts_manage(live, "register", "hostile.mar")
    assert done.returncode == 1 and "net.pt is not a loadable state_dict" in done.stderr, done.stderr
    time.sleep(1)
    assert not marker.exists()
    assert Api(live).predict("net", ROW).status_code == 200


def test_register_with_a_public_key_takes_only_archives_signed_with_its_private_key(live: RunDir, tmp_path: Path) -> None:
    from serveready.handlers.archive import Archive, generate_key

    private, public = generate_key(tmp_path / "archive")
    repack(live.model_store / "net.mar", live.model_store / "signed.mar", lambda e: None)
    unsigned = ts_manage(live, "register", "signed.mar", "--public-key", str(public))
    assert unsigned.returncode == 1 and "signed.mar is refused, not registered: it is not signed: no signed.mar.sig beside it" in unsigned.stderr
    Archive(live.model_store / "signed.mar").sign(private)
    done = ts_manage(live, "register", "signed.mar", "--public-key", str(public))
    assert done.returncode == 0, done.stderr
    assert Api(live).predict("signed", ROW).status_code == 200
