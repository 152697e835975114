"""serveready: from a trained PyTorch model to a live, safe, fast endpoint.

    serveready.load      an archive served in-process, answering as a TorchServe worker would
    serveready.handlers  the handler core; a copy travels inside every archive
    serveready.archiver  model configs -> verified, measured ``.mar`` archives
    serveready.scripts   ``ts-archive``, ``ts-server``, ``ts-manage``, ``ts-explain``, ``ts-gpu-check``

Nothing is imported here: a TorchServe worker imports ``serveready.handlers`` from an
archive without the archiver's or the scripts' dependencies, and the management tools
start without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

if TYPE_CHECKING:
    from pathlib import Path

    from .handlers.host import Model


def load(path: str | Path, device: str = "cpu", *, public_key: str | Path | None = None, threads: int | None = None,
         into: str | Path | None = None) -> Model:
    """Load a ``.mar`` as a TorchServe worker does (sums and signature checked, handler initialized) and
    answer requests in-process: ``load(path).predict(body, content_type=...)``.

    See :func:`serveready.handlers.host.load` for the arguments; it raises
    :class:`~serveready.handlers.errors.ArchiveError` for an archive that fails its checks and
    :class:`~serveready.handlers.errors.ModelLoadError` for one that cannot load.
    """
    from .handlers.host import load as _load

    return _load(path, device, public_key=public_key, threads=threads, into=into)


def __getattr__(name: str) -> Any:
    if name in ("Model", "Answer"):
        from .handlers import host

        return getattr(host, name)
    if name == "ServereadyError":
        from .handlers.errors import ServereadyError

        return ServereadyError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Answer", "Model", "ServereadyError", "__version__", "load"]
