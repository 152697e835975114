"""Command line for the archiver, installed as ``ts-archive``.

    ts-archive init NAME --model-file models/x.py --class X --input tabular   # a starter model_configs/NAME.yaml
    ts-archive train [NAME...] [--if-stale]                                    # recipes' weights, variants' files
    ts-archive build [NAME...] [--store model_store] [--if-stale]              # verified, measured archives
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .build import build_all
from .errors import ArchiverError
from .scaffold import INPUTS, init_config, parse_kwargs
from .spec import ModelSpec, load_specs
from .training import is_stale, train


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ts-archive", description="Write model configs, train models and pack them into TorchServe archives.")
    parser.add_argument("--configs", type=Path, default=Path("model_configs"), help="folder of model YAML files (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    i = sub.add_parser("init", help="write a commented starter config for a model of yours")
    i.add_argument("name", help="model name (letters, digits, _ - .)")
    i.add_argument("--model-file", type=Path, required=True, help="the Python file with the model class")
    i.add_argument("--class", dest="class_name", required=True, help="the torch.nn.Module subclass in it")
    i.add_argument("--input", choices=list(INPUTS), required=True, help="what a request carries: rows of numbers, or an image")
    i.add_argument("--sample-shape", type=int, nargs="+", help="a batch's shape, e.g. 2 30 or 2 3 224 224 (tabular: inferred from the first Linear)")
    i.add_argument("--kwarg", action="append", default=[], help="a keyword argument of the class, name=value (repeatable)")
    i.add_argument("--weights", type=Path, help="the state_dict file (default: artifacts/NAME.pt)")
    i.add_argument("--data", type=Path, help="held-out data: a torch.save'd dict with x_test, y_test (optionally x_train, y_train)")
    i.add_argument("--task", choices=["classification", "regression"], help="what --data's y holds (default: classification)")
    i.add_argument("--classes-file", type=Path, help="image classifiers: class names (JSON or one per line)")
    i.add_argument("--force", action="store_true", help="overwrite an existing config")
    t = sub.add_parser("train", help="train models with a training: recipe and derive variants' weights files")
    t.add_argument("names", nargs="*", help="model names (default: all)")
    t.add_argument("--if-stale", action="store_true", help="skip weights newer than everything they are made from")
    b = sub.add_parser("build", help="verify, pack, load and measure <store>/<name>.mar")
    b.add_argument("names", nargs="*", help="model names (default: all)")
    b.add_argument("--store", type=Path, default=Path("model_store"), help="output folder (default: %(default)s)")
    b.add_argument("--if-stale", action="store_true", help="skip archives newer than their config, weights and code")
    b.add_argument("--report-md", type=Path, help="Markdown report (default: <store>/report.md; report.json always goes to the store)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            path = init_config(
                args.name, args.model_file, args.class_name, args.input, args.configs,
                sample_shape=tuple(args.sample_shape) if args.sample_shape else None, kwargs=parse_kwargs(args.kwarg),
                weights=args.weights, data=args.data, task=args.task, classes_file=args.classes_file, force=args.force,
            )
            print(f"wrote {path}: check it, then `ts-archive build {args.name}`")
            return 0
        specs = load_specs(args.configs, args.names or None)
        if args.command == "train":
            _train(specs, args.if_stale, bool(args.names))
        else:
            build_all(specs, args.store, args.report_md, if_stale=args.if_stale)
    except ArchiverError as err:
        print(f"\nts-archive: error: {err.message}", file=sys.stderr)
        return 1
    return 0


def _train(specs: list[ModelSpec], if_stale: bool, named: bool) -> None:
    """Train recipes and derive variants, a progress line each; models whose weights are the user's are left alone."""
    yours = [s for s in specs if s.base is None and s.training is None]
    if yours and not named:
        print(f"not trained here (no training: recipe, the weights are yours): {', '.join(s.name for s in yours)}", file=sys.stderr)
        specs = [s for s in specs if s not in yours]
    if if_stale:
        specs = [s for s in specs if is_stale(s)]
    for i, spec in enumerate(specs, 1):
        verb = "deriving" if spec.base else "training"
        print(f"[{i}/{len(specs)}] {verb} {spec.name}", file=sys.stderr)
        result = train(spec)
        print(f"  {spec.name}: {result.weights} {json.dumps(result.metrics)}", file=sys.stderr)
