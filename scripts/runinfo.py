"""What a running TorchServe left in its run folder: config.properties and key_file.json.

``ts-server`` writes ``config.properties`` into the run folder and starts
TorchServe there, so TorchServe writes its ``key_file.json`` there too.
Both the server and the management scripts read them through this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from serveready.handlers.errors import ScriptError

__all__ = ["RunDir", "ScriptError", "TokenKind", "read_properties"]


class TokenKind(str, Enum):
    """TorchServe's three keys: one per API."""

    INFERENCE = "inference"
    MANAGEMENT = "management"
    API = "API"


def read_properties(path: Path) -> dict[str, str]:
    """Parse a Java ``.properties`` file of simple ``key=value`` lines."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


@dataclass(frozen=True)
class RunDir:
    """A server's run folder and what can be read from it."""

    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / "config.properties"

    @property
    def key_file(self) -> Path:
        return self.path / "key_file.json"

    @property
    def tmp_dir(self) -> Path:
        return self.path / "tmp"

    @property
    def log_dir(self) -> Path:
        return self.path / "logs"

    @property
    def batching_file(self) -> Path:
        return self.path / "batching.txt"

    @property
    def batching(self) -> str:
        """The aggregator the server runs with, as ``ts-server start`` found it (scripts/batching.py)."""
        return self.batching_file.read_text().strip() if self.batching_file.is_file() else "stock (not started by ts-server)"

    @property
    def console_log(self) -> Path:
        return self.path / "torchserve.out"

    def properties(self) -> dict[str, str]:
        if not self.config_file.is_file():
            raise ScriptError(f"no {self.config_file}: start a server first (ts-server start --run-dir {self.path})")
        return read_properties(self.config_file)

    @property
    def management_url(self) -> str:
        return self.properties()["management_address"]

    @property
    def inference_url(self) -> str:
        return self.properties()["inference_address"]

    @property
    def model_store(self) -> Path:
        return Path(self.properties()["model_store"])

    @property
    def gpus(self) -> int:
        return int(self.properties().get("number_of_gpu", "0"))

    def token(self, kind: TokenKind) -> str | None:
        """The current key of ``kind``, or None when token authorization is off."""
        if self.properties().get("disable_token_authorization", "false").lower() == "true":
            return None
        if not self.key_file.is_file():
            raise ScriptError(f"no {self.key_file}: TorchServe writes it at start; is the server in {self.path} running?")
        try:
            keys = json.loads(self.key_file.read_text())
            return str(keys[kind.value]["key"])
        except (ValueError, KeyError, TypeError) as err:
            raise ScriptError(f"{self.key_file} has no {kind.value} key ({err})") from err

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of TorchServe's console output (it has the stack traces), else of its log."""
        for path in (self.console_log, self.log_dir / "ts_log.log"):
            if path.is_file() and path.stat().st_size:
                return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log written)"
