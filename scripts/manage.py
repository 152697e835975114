"""Talk to TorchServe's management API (also installed as ``ts-manage``).

    ts-manage register model_store/net.mar --workers 2 --batch-size 8 --device cpu
    ts-manage scale net --min 2 --max 4
    ts-manage describe net | list | set-default net 1.0 | unregister net

It reads the management address, model store, GPU count and token from the
server's run folder (``--run-dir``, written by ``ts-server start``). Every
failure is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from archiver.spec import DeviceType
from scripts.runinfo import RunDir, ScriptError, TokenKind

CONFIG_ENTRY = "model-config.yaml"


class NotFound(ScriptError):
    """The server does not know the model (HTTP 404)."""


@dataclass(frozen=True)
class Client:
    """A management API endpoint and its token."""

    url: str
    token: str | None
    timeout: float = 60.0

    def call(self, method: str, path: str, **params: Any) -> Any:
        """One API call; HTTP and connection errors become one-line ScriptErrors."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        query = {k: v for k, v in params.items() if v is not None}
        try:
            reply = requests.request(method, f"{self.url}{path}", params=query, headers=headers, timeout=self.timeout)
        except requests.ConnectionError:
            raise ScriptError(f"cannot reach TorchServe's management API at {self.url}: is the server running? (ts-server start)") from None
        except requests.Timeout:
            raise ScriptError(f"TorchServe's management API at {self.url} did not answer within {self.timeout:.0f}s") from None
        body = _json(reply)
        if reply.ok:
            return body
        message = body.get("message", reply.text.strip()) if isinstance(body, dict) else reply.text.strip()
        if reply.status_code == 400 and "Token Authorization failed" in message:
            raise ScriptError(f"the management token was refused by {self.url} (expired or from another server): {message}")
        if reply.status_code == 404:
            raise NotFound(f"{method} {path} failed with HTTP 404: {message}")
        if reply.status_code == 405:
            raise ScriptError(f"{method} {path} is not allowed by the server: is enable_model_api=true in its config.properties?")
        raise ScriptError(f"{method} {path} failed with HTTP {reply.status_code}: {message}")


def _json(reply: requests.Response) -> Any:
    try:
        return reply.json()
    except ValueError:
        return {}


def archive_device(archive: Path) -> str | None:
    """The deviceType in an archive's model-config.yaml, if it sets one."""
    try:
        with zipfile.ZipFile(archive) as mar:
            config = yaml.safe_load(mar.read(CONFIG_ENTRY)) if CONFIG_ENTRY in mar.namelist() else {}
    except (zipfile.BadZipFile, yaml.YAMLError) as err:
        raise ScriptError(f"{archive} is not a readable model archive: {err}") from None
    return (config or {}).get("deviceType")


def retarget_archive(archive: Path, device: DeviceType) -> Path:
    """Write ``<stem>.<device>.mar`` beside ``archive`` with its model-config deviceType set to ``device``.

    TorchServe's register call has no device parameter: the archive's
    model-config.yaml decides, so a device choice means an archive that says it.
    """
    target = archive.with_name(f"{archive.stem}.{device.value}.mar")
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == CONFIG_ENTRY:
                config = yaml.safe_load(data) or {}
                config["deviceType"] = device.value
                data = yaml.safe_dump(config, sort_keys=False).encode()
            dst.writestr(item, data)
    return target


def _archive_in_store(archive: str, store: Path) -> Path:
    path = Path(archive)
    candidate = path if path.is_absolute() or path.exists() else store / path
    candidate = candidate.resolve()
    if not candidate.is_file():
        raise ScriptError(f"archive {archive} not found (looked in {store})")
    if candidate.parent != store.resolve():
        raise ScriptError(f"{candidate} is outside the model store {store}: the server only loads archives from there (allowed_urls); copy it in")
    return candidate


def _ready_workers(description: Any) -> list[dict[str, Any]]:
    versions = description if isinstance(description, list) else [description]
    return [w for v in versions for w in v.get("workers", []) if w.get("status") == "READY"]


def wait_ready(client: Client, name: str, workers: int, timeout: float) -> list[dict[str, Any]]:
    """Poll describe until ``workers`` workers are READY (/ping says Healthy long before that)."""
    deadline = time.monotonic() + timeout
    while True:
        ready = _ready_workers(client.call("GET", f"/models/{name}"))
        if len(ready) >= workers:
            return ready
        if time.monotonic() > deadline:
            raise ScriptError(f"model {name!r}: {len(ready)} of {workers} workers READY after {timeout:.0f}s; see the server's model_log.log")
        time.sleep(0.5)


def register(client: Client, run: RunDir, args: argparse.Namespace) -> str:
    device = DeviceType(args.device) if args.device else None
    if device is DeviceType.GPU and run.gpus == 0:
        raise ScriptError("GPU workers were asked for, but this server has no GPU (number_of_gpu=0); use --device cpu")
    archive = _archive_in_store(args.archive, run.model_store)
    if device is not None and archive_device(archive) != device.value:
        archive = retarget_archive(archive, device)
    name = args.name or archive.name.split(".")[0]
    try:
        client.call("GET", f"/models/{name}")
    except NotFound:
        pass
    else:
        raise ScriptError(f"model {name!r} is already registered: ts-manage unregister {name} first, or give another --name")
    try:
        client.call(
            "POST",
            "/models",
            url=archive.name,
            model_name=name,
            initial_workers=args.workers,
            batch_size=args.batch_size,
            max_batch_delay=args.max_batch_delay,
            response_timeout=args.response_timeout,
            synchronous="true",
        )
        # initial_workers is capped by the archive's maxWorkers: set both explicitly.
        client.call("PUT", f"/models/{name}", min_worker=args.workers, max_worker=args.workers, synchronous="true")
        ready = wait_ready(client, name, args.workers, args.timeout)
    except ScriptError as err:
        # Left registered, TorchServe would restart the failing workers forever.
        try:
            client.call("DELETE", f"/models/{name}")
        except ScriptError:
            pass
        raise ScriptError(f"{err.message}; {name!r} is not registered{_load_failure(run, name)}") from None
    on = "GPU" if any(w.get("gpu") for w in ready) else "CPU"
    return f"registered {name} from {archive.name}: {len(ready)} {on} worker(s) READY"


def _load_failure(run: RunDir, name: str) -> str:
    """The worker's own reason, from the server's model log, when it is readable here."""
    log = run.log_dir / "model_log.log"
    if not log.is_file():
        return ""
    marker = f"Failed to load model {name}, exception "
    reasons = [line.split(marker, 1)[1].strip() for line in log.read_text(errors="replace").splitlines() if marker in line]
    return f"; the worker said: {reasons[-1]}" if reasons else f"; see {log}"


def scale(client: Client, args: argparse.Namespace) -> str:
    maximum = args.max if args.max is not None else args.min
    client.call("PUT", f"/models/{args.name}", min_worker=args.min, max_worker=maximum, synchronous="true")
    ready = wait_ready(client, args.name, args.min, args.timeout)
    return f"scaled {args.name}: {len(ready)} worker(s) READY (min {args.min}, max {maximum})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ts-manage", description="Register and manage models on a TorchServe.")
    parser.add_argument("--run-dir", type=Path, default=Path(os.environ.get("TS_RUN_DIR", "run/default")), help="the server's folder, from ts-server (default: %(default)s, env TS_RUN_DIR)")
    parser.add_argument("--url", help="management API URL (default: from the run folder's config.properties)")
    parser.add_argument("--token", default=os.environ.get("TS_MANAGEMENT_TOKEN"), help="management key (default: from the run folder's key_file.json, env TS_MANAGEMENT_TOKEN)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for workers (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("register", help="register an archive from the model store and wait for its workers")
    r.add_argument("archive", help="a .mar in the model store (name or path)")
    r.add_argument("--name", help="model name (default: the archive's name)")
    r.add_argument("--workers", type=int, default=1, help="initial workers (default: %(default)s)")
    r.add_argument("--batch-size", type=int, help="TorchServe batch size (default: the archive's)")
    r.add_argument("--max-batch-delay", type=int, help="ms to wait to fill a batch (default: the archive's)")
    r.add_argument("--response-timeout", type=int, help="seconds a worker may take per batch")
    r.add_argument("--device", choices=[d.value for d in DeviceType], help="worker device (default: the archive's deviceType)")
    s = sub.add_parser("scale", help="set the number of workers and wait for them")
    s.add_argument("name")
    s.add_argument("--min", type=int, required=True)
    s.add_argument("--max", type=int)
    u = sub.add_parser("unregister", help="remove a model (all versions, or one)")
    u.add_argument("name")
    u.add_argument("version", nargs="?")
    sub.add_parser("list", help="registered models")
    d = sub.add_parser("describe", help="a model's versions, workers and settings (JSON)")
    d.add_argument("name")
    sd = sub.add_parser("set-default", help="make a version the default one")
    sd.add_argument("name")
    sd.add_argument("version")
    return parser


def run(args: argparse.Namespace) -> str:
    """Carry out one command and return what to print."""
    runinfo = RunDir(args.run_dir.resolve())
    url = args.url or runinfo.management_url
    token = args.token if args.token is not None else runinfo.token(TokenKind.MANAGEMENT)
    client = Client(url.rstrip("/"), token)
    if args.command == "register":
        return register(client, runinfo, args)
    if args.command == "scale":
        return scale(client, args)
    if args.command == "unregister":
        path = f"/models/{args.name}" + (f"/{args.version}" if args.version else "")
        return client.call("DELETE", path).get("status", f"unregistered {args.name}")
    if args.command == "list":
        return json.dumps(client.call("GET", "/models"), indent=2)
    if args.command == "describe":
        return json.dumps(client.call("GET", f"/models/{args.name}"), indent=2)
    return client.call("PUT", f"/models/{args.name}/{args.version}/set-default").get("status", "")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        print(run(args))
    except ScriptError as err:
        print(f"ts-manage: error: {err.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
