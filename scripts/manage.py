"""Talk to TorchServe's management API (installed as ``ts-manage``).

    ts-manage register net.mar --workers 2 --batch-size 8 --device cpu
    ts-manage rollout net net.mar          # the rebuilt archive, a new version: no downtime
    ts-manage scale net --min 2 --max 4
    ts-manage describe net [all] | list | set-default net 1.0 | unregister net

It reads the management address, model store, GPU count and token from the
server's run folder (``--run-dir``, written by ``ts-server start``). Every
failure is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from serveready.handlers.config import DeviceType
from serveready.handlers.errors import ServereadyError

from .client import DRAIN_SECONDS, Management, Workers
from .runinfo import RunDir


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
    _worker_options(r)
    ro = sub.add_parser("rollout", help="replace a registered model by a new version of it, without downtime")
    ro.add_argument("name", help="the registered model")
    ro.add_argument("archive", help="a .mar in the model store whose version differs from the registered ones")
    ro.add_argument("--keep-old", action="store_true", help="leave the old versions registered (back: ts-manage set-default NAME OLD)")
    ro.add_argument("--drain", type=float, default=DRAIN_SECONDS, metavar="SECONDS",
                    help="once no request is queued for the old versions, seconds their workers get to finish the batches they hold "
                         "before they are stopped; make it longer than your slowest batch (default: %(default)s)")
    _worker_options(ro)
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
    d.add_argument("version", nargs="?", help="one version, or all (default: the default version)")
    sd = sub.add_parser("set-default", help="make a version the default one")
    sd.add_argument("name")
    sd.add_argument("version")
    return parser


def _worker_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--workers", type=int, help="workers (default: the archive's minWorkers, else 1)")
    command.add_argument("--batch-size", type=int, help="TorchServe batch size (default: the archive's)")
    command.add_argument("--max-batch-delay", type=int, help="ms to wait to fill a batch (default: the archive's)")
    command.add_argument("--response-timeout", type=int, help="seconds a worker may take per batch")
    command.add_argument("--public-key", type=Path, help="refuse the archive unless NAME.mar.sig beside it verifies with this Ed25519 key (ts-archive sign)")
    command.add_argument("--device", choices=[d.value for d in DeviceType], help="worker device (default: the archive's deviceType)")


def run(args: argparse.Namespace) -> str:
    """Carry out one command and return what to print."""
    management = Management.from_run(RunDir(args.run_dir.resolve()), url=args.url, token=args.token)
    if args.command == "register":
        device = DeviceType(args.device) if args.device else None
        return str(management.register(args.archive, args.name, args.workers, args.batch_size, args.max_batch_delay, args.response_timeout, device,
                                       args.timeout, args.public_key))
    if args.command == "rollout":
        settings = Workers(args.workers, args.batch_size, args.max_batch_delay, args.response_timeout)
        device = DeviceType(args.device) if args.device else None
        return str(management.rollout(args.name, args.archive, settings, device, args.timeout, args.public_key, args.keep_old, args.drain))
    if args.command == "scale":
        return management.scale(args.name, args.min, args.max, args.timeout)
    if args.command == "unregister":
        return management.unregister(args.name, args.version)
    if args.command == "list":
        return json.dumps(management.models(), indent=2)
    if args.command == "describe":
        return json.dumps(management.describe(args.name, args.version), indent=2)
    return management.set_default(args.name, args.version)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        print(run(args))
    except ServereadyError as err:
        print(f"ts-manage: error: {err.message}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
