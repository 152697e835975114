"""``serveready.load``: an archive served in-process, answering as a TorchServe worker would, with no server.

    model = serveready.load("model_store/net.mar")          # checks SHA256SUMS (and a signature if asked)
    answer = model.predict(b'{"inputs": [0.1, ...]}', content_type="application/json")
    answer.status, answer.content_type, answer.body, answer.json()
    model.predict_batch([(body, content_type), ...])         # one answer each, as one TorchServe batch
    model.explain(body, content_type)                       # what /explanations/NAME answers
    model.close()                                           # or: with serveready.load(...) as model:

A request reaches the handler as TorchServe hands it over: an ``application/json`` body decoded
(raw bytes when it is not valid JSON), ``text/*`` as text, anything else as bytes, form bodies
as their fields, and the request headers with the two TorchServe adds (``explain``,
``url_path``). Answers are what TorchServe sends: the handler's status, content type and bytes,
and for a batch the model failed on, TorchServe's own error body (500, ``InternalServerException``).

One :class:`Model` may be called from several threads: calls take turns (a lock), as the
batches of one TorchServe worker do. For more throughput, batch requests in one call
(``predict_batch``) or load the archive once per process.

The archive runs with this installed library's handler code (the copy inside the archive is
what a TorchServe host without the library runs; both are the same for archives this version
built). Code of the user's inside the archive (model file, handler file or package) is
imported from the unpacked archive.
"""

from __future__ import annotations

import email.parser
import email.policy
import importlib
import json
import re
import shutil
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .archive import ENTRY_FILE, LIBRARY_DIR, LIBRARY_KEY, Archive
from .base import BatchHandler
from .engine import BatchFailed, Engine, ModelSource, Reply
from .errors import ModelLoadError
from .observe import BatchStats, Totals
from .payload import Request

#: what TorchServe's frontend answers when a worker fails a whole batch (NettyUtils.sendError)
FRONTEND_ERROR_TYPE = "InternalServerException"
_ENTRY_IMPORT = re.compile(r"^\s*from (\S+) import (\w+) as _Handler\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Answer:
    """What TorchServe would send back for one request."""

    status: int
    content_type: str | None
    body: bytes
    #: the HTTP reason phrase TorchServe sends with an error (the error's message)
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


RequestLike = bytes | str | Mapping[str, Any] | list[Any]


class Model:
    """An archive loaded in this process: ``predict``, ``predict_batch``, ``explain``; ``close`` when done."""

    def __init__(self, archive: Archive, folder: Path, engine: Engine, owns_folder: bool) -> None:
        self.archive = archive
        self.folder = folder
        self.engine = engine
        self._owns_folder = owns_folder
        self._lock = threading.Lock()
        self._totals = Totals()
        self.closed = False

    def __repr__(self) -> str:
        return f"<serveready Model {self.name} {self.version} from {self.archive.path}: {self.engine.loaded.describe()}>"

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def version(self) -> str | None:
        return self.engine.version

    @property
    def handler(self) -> BatchHandler:
        return self.engine.handler

    @property
    def runs_with(self) -> str:
        """What computes, and where ("torch float32 on cpu")."""
        return self.engine.loaded.describe()

    def metrics(self) -> dict[str, Any]:
        """The handler's counters so far (batches, rows, stage milliseconds, refusals), by their Prometheus names."""
        return self._totals.snapshot()

    def predict(self, body: RequestLike, content_type: str | None = None, headers: Mapping[str, str] | None = None) -> Answer:
        """What ``POST /predictions/NAME`` answers for this body (``content_type`` as the client would send it)."""
        return self.predict_batch([(body, content_type, headers)])[0]

    def explain(self, body: RequestLike, content_type: str | None = None, headers: Mapping[str, str] | None = None) -> Answer:
        """What ``POST /explanations/NAME`` answers for this body."""
        return self._answer([torchserve_request(body, content_type, headers, explain=True)])[0]

    def predict_batch(self, requests: Iterable[tuple[Any, ...]]) -> list[Answer]:
        """Several requests, each ``(body, content_type)`` or ``(body, content_type, headers)``, as one batch:
        one answer each, in order; a bad request fails alone."""
        return self._answer([torchserve_request(*request) for request in requests])

    def _answer(self, requests: list[Request]) -> list[Answer]:
        if self.closed:
            raise ModelLoadError(f"model {self.name} was closed")
        stats = BatchStats()
        with self._lock:
            try:
                replies = self.engine.answer(requests, stats)
            except BatchFailed as err:
                self._totals.add(stats)
                return [frontend_error(err.status, err.message) for _ in requests]
        self._totals.add(stats)
        return [as_answer(reply) for reply in replies]

    def close(self) -> None:
        """Drop the model and remove the unpacked archive (when ``load`` unpacked it)."""
        self.closed = True
        self.engine.close()
        if self._owns_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(path: str | Path, device: str = "cpu", *, public_key: str | Path | None = None, threads: int | None = None,
         into: str | Path | None = None) -> Model:
    """Load an archive as a TorchServe worker does: check it, unpack it, initialize its handler.

    Args:
        path: the ``.mar``.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (the GPU a worker would be given).
        public_key: refuse the archive unless ``NAME.mar.sig`` beside it verifies with this Ed25519 key.
        threads: torch threads for this process; None sets them as a worker does (``handler.torch_threads``,
            else cores / maxWorkers), 0 leaves them alone.
        into: unpack here (kept after ``close``) instead of a temporary folder.

    Raises:
        ArchiveError: unreadable, changed since its build, or not signed by ``public_key``.
        ModelLoadError: the model, weights or handler cannot be loaded (ConfigError: an option is wrong).
    """
    archive = Archive(path)
    archive.check(None if public_key is None else Path(public_key), outcome="not loaded")
    folder = Path(into) if into is not None else Path(tempfile.mkdtemp(prefix=f"serveready-{archive.name}-"))
    try:
        archive.unpack(folder)
        manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())
        config = archive.config
        handler_class = handler_class_of(folder, config)
        source = ModelSource(folder, manifest, config, name=str((manifest.get("model") or {}).get("modelName") or archive.name),
                             gpu_id=_gpu_id(device), threads=threads)
        engine = Engine(handler_class, source)
    except BaseException:
        if into is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return Model(archive, folder, engine, owns_folder=into is None)


def handler_class_of(folder: Path, config: Mapping[str, Any]) -> type[BatchHandler]:
    """The handler class an unpacked archive names (model-config's ``serveready.handler``, or its entry module's import)."""
    named = (config.get(LIBRARY_KEY) or {}).get("handler") if isinstance(config.get(LIBRARY_KEY), dict) else None
    if named:
        module, _, class_name = str(named).partition(":")
    else:  # archives built before model-config said it
        found = _ENTRY_IMPORT.search((folder / ENTRY_FILE).read_text()) if (folder / ENTRY_FILE).is_file() else None
        if found is None:
            raise ModelLoadError(f"{folder.name}: the archive does not say which handler serves it (no {LIBRARY_KEY}.handler in its model-config)")
        module, class_name = found.groups()
    if module.split(".")[0] == LIBRARY_DIR:
        imported = importlib.import_module(module)
    else:
        imported = _import_from(folder, module)
    cls = getattr(imported, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, BatchHandler)):
        raise ModelLoadError(f"{module}:{class_name} in the archive is not a serveready BatchHandler")
    return cls


def _import_from(folder: Path, module: str) -> Any:
    """Import a module of the user's from the unpacked archive, not from another archive's copy of the same name."""
    top = module.split(".")[0]
    for name in [n for n in sys.modules if n == top or n.startswith(f"{top}.")]:
        origin = getattr(sys.modules[name], "__file__", None) or ""
        if not Path(origin).resolve().is_relative_to(folder.resolve()):
            del sys.modules[name]  # another archive's module of that name: objects made from it keep working
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(module)
    except Exception as err:
        raise ModelLoadError(f"this archive's handler module {module} cannot be imported: {type(err).__name__}: {err}") from err
    finally:
        sys.path.remove(str(folder))


def _gpu_id(device: str) -> int | None:
    text = str(device)
    if text == "cpu":
        return None
    if text == "cuda":
        return 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    raise ModelLoadError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


# -- TorchServe's side of a request and an answer ------------------------------------


def torchserve_request(body: RequestLike, content_type: str | None = None, headers: Mapping[str, str] | None = None,
                       explain: bool = False) -> Request:
    """A request as TorchServe's frontend and worker hand it to a handler.

    The frontend takes the content type without its parameters, splits form bodies into fields,
    copies the request headers and adds ``explain`` (and ``url_path``); the worker decodes an
    ``application/json`` body (keeping the bytes when it is not JSON) and ``text/*`` as UTF-8.
    """
    if isinstance(body, (Mapping, list)):
        body, content_type = json.dumps(body).encode(), content_type or "application/json"
    elif isinstance(body, str):
        body = body.encode()
    data = bytes(body)
    given = {str(k): str(v) for k, v in (headers or {}).items()}
    if content_type is not None and not any(k.lower() == "content-type" for k in given):
        given["Content-Type"] = content_type
    full = next((v for k, v in given.items() if k.lower() == "content-type"), None)
    mime = full.split(";")[0].strip() if full else ""
    seen = {k.lower(): v for k, v in given.items()}
    seen.update({"url_path": "", "explain": "True" if explain else "False"})
    if full and full.lower().startswith("multipart/form-data"):
        fields = _multipart(full, data)
    elif mime.lower() == "application/x-www-form-urlencoded":
        fields = {k: v.encode() for k, v in urllib.parse.parse_qsl(data.decode("utf-8", "replace"), keep_blank_values=True)}
    else:
        fields = {"body": _worker_value(data, mime)}
    return Request(fields, seen, explain)


def _worker_value(data: bytes, content_type: str) -> Any:
    # ts/protocol/otf_message_handler.py::_retrieve_input_data, exactly (the comparison is case-sensitive).
    try:
        if content_type == "application/json":
            return json.loads(data.decode("utf-8"))
        if content_type.startswith("text"):
            return data.decode("utf-8")
    except Exception:  # the worker forwards the bytes when decoding fails
        return data
    return data


def _multipart(content_type: str, data: bytes) -> dict[str, Any]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + data)
    fields: dict[str, Any] = {}
    if not message.is_multipart():
        return fields
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = part.get_payload(decode=True) or b""
    return fields


def as_answer(reply: Reply) -> Answer:
    """A reply in the bytes TorchServe sends: JSON compact (the handler encodes it), bytes as they are."""
    body, content_type = reply.body, None
    if isinstance(body, (dict, list)):
        body, content_type = json.dumps(body, separators=(",", ":")).encode(), "application/json"
    elif isinstance(body, str):
        body = body.encode()
    elif not isinstance(body, (bytes, bytearray)):
        body = json.dumps(body, indent=2).encode()  # what TorchServe's worker does with anything else
    return Answer(reply.status, content_type, bytes(body), reply.message)


def frontend_error(status: int, message: str) -> Answer:
    """TorchServe's frontend's own error answer (GSON, pretty-printed, then a newline)."""
    status = 507 if status == 413 else status
    body = json.dumps({"code": status, "type": FRONTEND_ERROR_TYPE, "message": message}, indent=2, ensure_ascii=False) + "\n"
    return Answer(status, "application/json", body.encode(), message)


__all__ = ["Answer", "Model", "load", "torchserve_request"]
