"""Command line for the archiver, installed as ``ts-archive`` (also ``python -m serveready.scripts.archive``).

    ts-archive init NAME --model-file models/x.py --class X --input tabular   # a starter model_configs/NAME.yaml
    ts-archive train [NAME...] [--if-stale]                                    # recipes' weights, variants' files
    ts-archive build [NAME...] [--store model_store] [--if-stale]              # verified, measured archives
    ts-archive tune NAME [--concurrency 1,8,32,64] [--p99-ms 50]               # measured serve: settings
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from serveready.archiver.build import build_all
from serveready.archiver.scaffold import INPUTS, init_config, parse_kwargs
from serveready.archiver.spec import ModelSpec, load_specs
from serveready.archiver.training import is_stale, train
from serveready.handlers.archive import Archive, generate_key
from serveready.handlers.errors import ServereadyError

from .tune import tune_command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ts-archive", description="Write model configs, train models and pack them into TorchServe archives.")
    parser.add_argument("--configs", type=Path, default=Path("model_configs"), help="folder of model YAML files (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    _init_options(sub)
    t = sub.add_parser("train", help="train models with their training: hook and derive variants' weights files")
    t.add_argument("names", nargs="*", help="model names (default: all)")
    t.add_argument("--if-stale", action="store_true", help="skip weights newer than everything they are made from")
    b = sub.add_parser("build", help="verify, pack, load and measure <store>/<name>.mar")
    b.add_argument("names", nargs="*", help="model names (default: all)")
    b.add_argument("--store", type=Path, default=Path("model_store"), help="output folder (default: %(default)s)")
    b.add_argument("--if-stale", action="store_true", help="skip archives newer than their config, weights and code")
    b.add_argument("--report-md", type=Path, help="Markdown report (default: <store>/report.md; report.json always goes to the store)")
    v = sub.add_parser("verify", help="check archives offline: every file listed in SHA256SUMS, present and unchanged")
    v.add_argument("archives", nargs="+", type=Path, help=".mar files")
    v.add_argument("--public-key", type=Path, help="also check each NAME.mar.sig with this Ed25519 public key")
    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing archives: KEY (private, mode 600) and KEY.pub")
    k.add_argument("key", type=Path)
    g = sub.add_parser("sign", help="sign archives: NAME.mar.sig beside each")
    g.add_argument("archives", nargs="+", type=Path, help=".mar files")
    g.add_argument("--key", type=Path, required=True, help="the private key (ts-archive keygen)")
    x = sub.add_parser("triton", help="export models as a Triton model repository (<out>/<name>/config.pbtxt, 1/model.onnx)")
    x.add_argument("names", nargs="*", help="model names (default: every fp32 config)")
    x.add_argument("--out", type=Path, default=Path("triton_repository"), help="the repository folder (default: %(default)s)")
    _kserve_options(sub)
    r = sub.add_parser("ray", help="write a Ray Serve config for the model store (serve deploy FILE): one deployment per archive")
    r.add_argument("names", nargs="*", help="archive names (default: every .mar in the store)")
    r.add_argument("--store", type=Path, default=Path("model_store"), help="where the built archives are (default: %(default)s)")
    r.add_argument("--out", type=Path, default=Path("serve_config.yaml"), help="the config file (default: %(default)s)")
    r.add_argument("--host", default="127.0.0.1", help="where Serve's HTTP proxy listens (default: %(default)s)")
    r.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    r.add_argument("--num-cpus", type=float, default=0.25, help="CPUs each replica reserves (default: %(default)s)")
    r.add_argument("--replicas", type=int, help="replicas of every deployment (default: each archive's minWorkers/maxWorkers)")
    _tune_options(sub)
    return parser




def _init_options(sub: Any) -> None:
    """``ts-archive init``."""
    i = sub.add_parser("init", help="write a commented starter config for a model of yours")
    i.add_argument("name", help="model name (letters, digits, _ - .)")
    i.add_argument("--model-file", type=Path, required=True, help="the Python file with the model class")
    i.add_argument("--class", dest="class_name", required=True, help="the torch.nn.Module subclass in it")
    i.add_argument("--input", choices=list(INPUTS), required=True, help="what a request carries: rows of numbers, an image, text or an audio clip")
    i.add_argument("--sample-shape", type=int, nargs="+",
                   help="a batch's shape, e.g. 2 30 or 2 3 224 224 (tabular: inferred from the first Linear; text: 2 16, [batch, tokens])")
    i.add_argument("--kwarg", action="append", default=[], help="a keyword argument of the class, name=value (repeatable)")
    i.add_argument("--weights", type=Path, help="the state_dict file (default: artifacts/NAME.pt)")
    i.add_argument("--data", type=Path, help="held-out data: a torch.save'd dict with x_test, y_test (optionally x_train, y_train)")
    i.add_argument("--task", choices=["classification", "regression"], help="what --data's y holds (default: classification)")
    i.add_argument("--classes-file", type=Path, help="classifiers: class names (JSON or one per line)")
    i.add_argument("--tokenizer", type=Path, help="text: the Hugging Face tokenizer.json (default: tokenizer.json in the folder)")
    i.add_argument("--force", action="store_true", help="overwrite an existing config")

def _kserve_options(sub: Any) -> None:
    """``ts-archive kserve``."""
    e = sub.add_parser("kserve", help="write KServe storage trees (config/, model-store/) and InferenceService manifests")
    e.add_argument("names", nargs="*", help="model names (default: every model that is no variant)")
    e.add_argument("--store", type=Path, default=Path("model_store"), help="where the built archives are (default: %(default)s)")
    e.add_argument("--out", type=Path, default=Path("kserve"), help="one folder per model goes here (default: %(default)s)")
    e.add_argument("--protocol", choices=["v1", "v2"], default="v1", help="KServe protocol (default: %(default)s)")
    e.add_argument("--storage-uri", default="pvc://models", help="where the trees will live; each model's is <uri>/<name> (default: %(default)s)")
    e.add_argument("--gpu", action="store_true", help="ask for one nvidia.com/gpu per replica")
    e.add_argument("--cpu", default="1", help="CPU request and limit (default: %(default)s)")
    e.add_argument("--memory", default="2Gi", help="memory request and limit (default: %(default)s)")
    e.add_argument("--min-replicas", type=int, default=1)
    e.add_argument("--max-replicas", type=int, default=1)
    e.add_argument("--canary", type=int, help="canaryTrafficPercent for a rollout of a new revision")
    e.add_argument("--namespace", help="metadata.namespace of the manifests")
    e.add_argument("--runtime", choices=["torchserve", "serveready"], default="torchserve",
                   help="torchserve: KServe's TorchServe runtime (being removed from KServe); serveready: this library's "
                        "runtime (KServe's model server, python -m serveready.kserve): also writes serveready-runtime.yaml "
                        "and its Dockerfile (default: %(default)s)")
    e.add_argument("--image", default="serveready-kserve:0.3.0", help="the serveready runtime's image (default: %(default)s)")

def _tune_options(sub: Any) -> None:
    """``ts-archive tune``."""
    u = sub.add_parser("tune", help="measure workers x batch x delay x threads on a real TorchServe and write the best into serve:")
    u.add_argument("name", help="model name (its archive must be built)")
    u.add_argument("--store", type=Path, default=Path("model_store"), help="where NAME.mar is (default: %(default)s)")
    u.add_argument("--concurrency", type=_ints, default=(1, 8, 32, 64), help="closed-loop clients per level (default: 1,8,32,64)")
    u.add_argument("--p99-ms", type=float, default=50.0, help="p99 bound every level must meet (default: %(default)s)")
    u.add_argument("--lone-slowdown", type=float, default=1.25,
                   help="refuse settings whose p50 at the lowest concurrency exceeds this times the best one's there, "
                        "or the best + 0.5 ms if more (a lone client must not wait for a batch); 0 turns it off (default: %(default)s)")
    u.add_argument("--seconds", type=float, default=2.5, help="seconds per level and repeat for the finalists (default: %(default)s)")
    u.add_argument("--screen-seconds", type=float, default=1.5, help="seconds per level to screen every candidate (default: %(default)s)")
    u.add_argument("--keep", type=int, default=3, help="finalists measured at every level (default: %(default)s)")
    u.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the finalists; medians are kept (default: %(default)s)")
    u.add_argument("--warmup", type=float, default=20.0, help="seconds of traffic before the first measurement (the Java frontend's JIT; default: %(default)s)")
    u.add_argument("--workers", type=_ints, default=(1, 2), help="worker counts to try (default: 1,2)")
    u.add_argument("--batch-sizes", type=_ints, default=(1, 4, 8, 16), help="batchSize values to try (default: 1,4,8,16)")
    u.add_argument("--delays", type=_ints, default=(0, 1, 5), help="maxBatchDelay values (ms) to try (default: 0,1,5)")
    u.add_argument("--threads", type=_ints, help="torch threads per worker to try, up to the cores each (default: 1 and cores/workers, so workers x threads <= cores)")
    u.add_argument("--body", type=Path, help="the request body to send (default: one made for the built-in handler)")
    u.add_argument("--content-type", default="application/json", help="with --body (default: %(default)s)")
    u.add_argument("--out", type=Path, default=Path("docs/tuning"), help="NAME.md, NAME.png and NAME.json go here (default: %(default)s)")
    u.add_argument("--dry-run", action="store_true", help="measure and report, leave the config alone")
    u.add_argument("--from-json", type=Path, help="pick again from a previous run's NAME.json instead of measuring")

def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            path = init_config(
                args.name, args.model_file, args.class_name, args.input, args.configs,
                sample_shape=tuple(args.sample_shape) if args.sample_shape else None, kwargs=parse_kwargs(args.kwarg),
                weights=args.weights, data=args.data, task=args.task, classes_file=args.classes_file, tokenizer=args.tokenizer, force=args.force,
            )
            print(f"wrote {path}: check it, then `ts-archive build {args.name}`")
            return 0
        if args.command == "tune":
            return tune_command(args)
        if args.command == "verify":
            return _verify(args.archives, args.public_key)
        if args.command == "keygen":
            private, public = generate_key(args.key)
            print(f"wrote {private} (private: keep it on the build machine) and {public} (give it to the servers)")
            return 0
        if args.command == "sign":
            for archive in args.archives:
                print(f"{archive}: signed, {Archive(archive).sign(args.key)}")
            return 0
        if args.command == "ray":
            from serveready.archiver.ray_config import serve_config, write

            out = write(serve_config(args.store, args.names, args.host, args.port, args.num_cpus, args.replicas), args.out)
            print(f"wrote {out}: ray start --head, then serve deploy {out} (Serve's proxy on http://{args.host}:{args.port})")
            return 0
        specs = load_specs(args.configs, args.names or None)
        if args.command == "triton":
            return _triton(specs, args.out, bool(args.names))
        if args.command == "kserve":
            return _kserve(specs, args, bool(args.names))
        if args.command == "train":
            _train(specs, args.if_stale, bool(args.names))
        else:
            build_all(specs, args.store, args.report_md, if_stale=args.if_stale)
    except ServereadyError as err:
        print(f"\nts-archive: error: {err.message}", file=sys.stderr)
        return err.exit_code
    return 0


def _triton(specs: list[ModelSpec], out: Path, named: bool) -> int:
    """Export each spec (without names: the models that are no variant), a progress line each."""
    from serveready.archiver.triton import export

    chosen = specs if named else [s for s in specs if s.base is None]
    for i, spec in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {spec.name}: exporting ONNX ... ", end="", file=sys.stderr, flush=True)
        print(export(spec, out), file=sys.stderr)
    print(f"Triton model repository: {out} (tritonserver --model-repository {out})")
    return 0


def _kserve(specs: list[ModelSpec], args: argparse.Namespace, named: bool) -> int:
    from serveready.archiver.kserve import Deployment, export

    deployment = Deployment(args.protocol, args.storage_uri, args.gpu, args.cpu, args.memory, args.min_replicas, args.max_replicas,
                            args.canary, args.namespace, args.runtime, args.image)
    chosen = specs if named else [s for s in specs if s.base is None]
    for spec in chosen:
        folder = export(spec, args.store / spec.archive_name, args.out, deployment)
        print(f"{spec.name}: {folder}/ (copy it to {args.storage_uri.rstrip('/')}/{spec.name}; kubectl apply -f {folder}/inferenceservice.yaml)")
    return 0


def _verify(archives: list[Path], public_key: Path | None = None) -> int:
    """One line per archive; exit status 1 if any fails."""
    failed = 0
    for archive in archives:
        problems = Archive(archive).problems() + (Archive(archive).signature_problems(public_key) if public_key else [])
        failed += bool(problems)
        signed = f" and its signature verifies with {public_key}" if public_key else ""
        print(f"{archive}: " + ("FAILED: " + "; ".join(problems) if problems else f"ok, every file matches SHA256SUMS{signed}"))
    return 1 if failed else 0


def _train(specs: list[ModelSpec], if_stale: bool, named: bool) -> None:
    """Train with the configs' hooks and derive variants, a progress line each; models whose weights are the user's are left alone."""
    yours = [s for s in specs if s.base is None and s.training is None]
    if yours and not named:
        print(f"not trained here (no training: hook, the weights are yours): {', '.join(s.name for s in yours)}", file=sys.stderr)
        specs = [s for s in specs if s not in yours]
    if if_stale:
        specs = [s for s in specs if is_stale(s)]
    for i, spec in enumerate(specs, 1):
        verb = "deriving" if spec.base else "training"
        print(f"[{i}/{len(specs)}] {verb} {spec.name}", file=sys.stderr)
        result = train(spec)
        print(f"  {spec.name}: {result.weights} {json.dumps(result.metrics)}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
