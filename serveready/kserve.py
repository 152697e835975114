"""Every archive of a model store on KServe's own Python model server, answering as TorchServe does.

    python -m serveready.kserve --model_dir model_store [--model_name net ...] [--http_port 8080] [--grpc_port 8081]

One ``kserve.Model`` per archive, loaded with :func:`serveready.load` (sums, and a signature with
``--public_key``, checked before any of its code runs). The inference routes (TorchServe's
``/predictions/NAME`` and ``/explanations/NAME``, KServe v1 ``/v1/models/NAME:predict`` and
``:explain``, Open Inference Protocol v2 ``/v2/models/NAME/infer`` in JSON or with the binary
extension) hand the archive's handler the request's own bytes, so bodies, statuses and messages
are TorchServe's; KServe's server keeps what it does well: health (``/v2/health/live``,
``/v2/health/ready``, ``/v2/models/NAME/ready``), v2 model metadata, ``/metrics`` (KServe's and the
handler's ``serveready_*`` counters), and gRPC (v2 ``ModelInfer``, tensors answered as
``raw_output_contents``, which ``tritonclient.grpc`` reads).

Safe defaults: it listens on 127.0.0.1 (KServe's own server listens on every interface;
``--host 0.0.0.0`` in a pod), refuses bodies over 8 MiB with 413, and with ``--key_file`` (or
``SERVEREADY_KEY``) every call but health and metrics needs ``Authorization: Bearer <key>``.
``--workers N`` runs N such servers on the same ports (:mod:`serveready.workers`).
Requests that arrive together run as one batch, up to the archive's batch size, and a lone one
does not wait (:class:`serveready.hosting.Batcher`).

Importing this module reads no command line (importing ``kserve`` does: :func:`main` imports it
with only KServe's own arguments in ``sys.argv``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import hosting

KEY_ENV = "SERVEREADY_KEY"


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered in ("true", "1", "yes")


def parser() -> argparse.ArgumentParser:
    """The command line: KServe's own argument names where KServe has them."""
    p = argparse.ArgumentParser(prog="python -m serveready.kserve", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_dir", type=Path, required=True, help="the model store: every .mar in it is served")
    p.add_argument("--model_name", action="append", default=[], help="serve only this archive (NAME.mar; repeatable)")
    p.add_argument("--http_port", type=int, default=8080)
    p.add_argument("--grpc_port", type=int, default=8081)
    p.add_argument("--enable_grpc", type=_flag, default=True)
    p.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the ports, each holding every model (a dead one is restarted): one per core for small models")
    p.add_argument("--http_fd", type=int, help=argparse.SUPPRESS)  # a worker's inherited HTTP socket (serveready.workers)
    p.add_argument("--host", default=hosting.DEFAULT_HOST, help="the address both servers listen on (0.0.0.0 in a container)")
    p.add_argument("--key_file", type=Path, help=f"a file holding the bearer key calls must carry (or the {KEY_ENV} environment variable)")
    p.add_argument("--public_key", type=Path, help="refuse archives without a NAME.mar.sig this Ed25519 key verifies")
    p.add_argument("--max_request_size", type=int, default=hosting.MAX_BODY, help="bytes; larger requests get 413")
    return p


def bearer_key(args: argparse.Namespace) -> str | None:
    """The key calls must carry: ``--key_file``'s first line, else ``SERVEREADY_KEY``, else none."""
    if args.key_file is not None:
        key = args.key_file.read_text().strip()
        if not key:
            raise SystemExit(f"serveready.kserve: {args.key_file} holds no key")
        return key
    return os.environ.get(KEY_ENV) or None


def kserve_argv(args: argparse.Namespace) -> list[str]:
    """What ``kserve.model_server`` parses at import: only its own arguments, so it cannot trip over ours."""
    return [sys.argv[0] if sys.argv else "serveready.kserve", "--http_port", str(args.http_port), "--grpc_port", str(args.grpc_port),
            "--workers", "1", "--enable_grpc", str(args.enable_grpc).lower(),
            "--grpc_max_receive_message_length", str(args.max_request_size),
            "--grpc_max_send_message_length", str(args.max_request_size)]


def worker_argv(args: argparse.Namespace, fd: int) -> list[str]:
    """One worker's command line under ``--workers N``: the same server, one process, on the inherited socket."""
    command = [sys.executable, "-m", "serveready.kserve", "--model_dir", str(args.model_dir), "--http_port", str(args.http_port),
               "--grpc_port", str(args.grpc_port), "--enable_grpc", str(args.enable_grpc).lower(), "--host", args.host,
               "--max_request_size", str(args.max_request_size), "--http_fd", str(fd)]
    for name in args.model_name:
        command += ["--model_name", name]
    for flag, value in (("--key_file", args.key_file), ("--public_key", args.public_key)):
        if value is not None:
            command += [flag, str(value)]
    return command


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.workers < 1:
        print(f"serveready.kserve: error: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(name)s %(levelname)s %(message)s")
    if args.workers > 1 and args.http_fd is None:
        from .workers import supervise

        try:
            hosting.archives(args.model_dir, args.model_name)  # a wrong store fails here, once, not in every copy
        except hosting.ServereadyError as err:
            print(f"serveready.kserve: error: {err}", file=sys.stderr)
            return err.exit_code
        return supervise(lambda fd: worker_argv(args, fd), args.host, args.http_port, args.workers)
    sys.argv = kserve_argv(args)
    from . import _kserve_server  # imports kserve, which parses sys.argv

    try:
        return _kserve_server.serve(args.model_dir, args.model_name, host=args.host, key=bearer_key(args),
                                    public_key=args.public_key, limit=args.max_request_size, grpc=args.enable_grpc,
                                    http_fd=args.http_fd)
    except hosting.ServereadyError as err:
        print(f"serveready.kserve: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
