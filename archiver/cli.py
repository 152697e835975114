"""Command line for the archiver (also installed as ``ts-archive``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from archiver.build import build_all
from archiver.errors import ArchiverError
from archiver.spec import load_specs
from archiver.training import is_stale, train


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ts-archive", description="Train models and pack them into TorchServe archives.")
    parser.add_argument("--configs", type=Path, default=Path("model_configs"), help="folder of model YAML files (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train models and save their state_dicts")
    t.add_argument("names", nargs="*", help="model names (default: all)")
    t.add_argument("--if-stale", action="store_true", help="skip models whose weights are newer than their config and model file")
    b = sub.add_parser("build", help="verify weights and write <store>/<name>.mar")
    b.add_argument("names", nargs="*", help="model names (default: all)")
    b.add_argument("--store", type=Path, default=Path("model_store"), help="output folder (default: %(default)s)")
    b.add_argument("--if-stale", action="store_true", help="skip archives newer than their config, weights and code")
    b.add_argument("--report-md", type=Path, default=Path("docs/variants.md"), help="Markdown fidelity table (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        specs = load_specs(args.configs, args.names or None)
        if args.command == "train":
            if args.if_stale:
                specs = [s for s in specs if is_stale(s)]
            for i, spec in enumerate(specs, 1):
                verb = "deriving" if spec.base else "training"
                print(f"[{i}/{len(specs)}] {verb} {spec.name}", file=sys.stderr)
                result = train(spec)
                print(f"  {spec.name}: {result.weights} {json.dumps(result.metrics)}", file=sys.stderr)
        else:
            build_all(specs, args.store, args.report_md, if_stale=args.if_stale)
    except ArchiverError as err:
        print(f"\nts-archive: error: {err.message}", file=sys.stderr)
        return 1
    return 0
