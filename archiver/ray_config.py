"""``ts-archive ray``: a Ray Serve config file for a model store (``serve deploy serve_config.yaml``).

The application is :func:`serveready.ray.app` over the store; the config also lists each archive's
deployment with the replicas its ``serve:`` section asks for (``minWorkers == maxWorkers``: that
many; otherwise an autoscaling range) and what each replica reserves, so an operator edits one
file to scale. Reads the archives' model-configs only: nothing here imports Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from serveready.handlers.archive import Archive, store_archives
from serveready.handlers.errors import ConfigError

from .errors import ArchiverError

#: what a replica reserves unless told otherwise (serveready.ray.DEFAULT_CPUS)
DEFAULT_CPUS = 0.25
#: seconds Serve's proxy waits for an answer before 408: TorchServe's default_response_timeout
REQUEST_TIMEOUT_S = 120


def deployment(archive: Archive, num_cpus: float, replicas: int | None = None) -> dict[str, Any]:
    """One archive's deployment entry: its name, replicas (``replicas``, else the archive's workers) and what each reserves."""
    low, high = (replicas, replicas) if replicas is not None else archive.workers
    entry: dict[str, Any] = {"name": archive.path.stem}  # the deployment serveready.ray names after the file
    if low == high:
        entry["num_replicas"] = low
    else:
        entry["autoscaling_config"] = {"min_replicas": low, "max_replicas": high}
    entry["ray_actor_options"] = {"num_cpus": num_cpus, "num_gpus": 1.0 if archive.device == "gpu" else 0.0}
    return entry


def serve_config(store: Path, names: list[str], host: str = "127.0.0.1", port: int = 8000, num_cpus: float = DEFAULT_CPUS,
                 replicas: int | None = None) -> dict[str, Any]:
    """The config: Serve's proxy on ``host:port`` (one, on the head node), the application at ``/``; ``replicas``
    for every deployment instead of each archive's workers (a laptop: 1)."""
    if replicas is not None and replicas < 1:
        raise ArchiverError(f"--replicas must be at least 1, got {replicas}")
    try:
        found = store_archives(store, names).values()
    except ConfigError as err:
        raise ArchiverError(err.message) from None
    args: dict[str, Any] = {"store": str(store.resolve()), "num_cpus": num_cpus}
    if names:
        args["models"] = ",".join(names)
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port, "request_timeout_s": REQUEST_TIMEOUT_S},
        "applications": [{
            "name": "serveready",
            "route_prefix": "/",
            "import_path": "serveready.ray:app",
            "args": args,
            "deployments": [deployment(Archive(path), num_cpus, replicas) for path in found],
        }],
    }


def write(config: dict[str, Any], out: Path) -> Path:
    header = "# written by ts-archive ray: `ray start --head`, then `serve deploy " + out.name + "`; edit replicas here\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return out
