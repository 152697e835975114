"""What a config names in the user's folder (a handler, a training hook), and what an archive must carry for it.

``handler.entry`` and ``training.recipe`` take the same forms:

    tabular, image_classifier          a built-in handler, by name (handlers only)
    my_handler.py[:Name]               a file in the user's folder (relative to it)
    package.module:Name                a module of the user's folder, importable from it

Every archive gets the same small generated entry module (``serveready_entry.py``) that
checks the archive's sums, then imports the handler class from the archive's own copy of
the code and defines the one class TorchServe wants (a :class:`~serveready.handlers.torchserve.TorchServeEntry`
naming it): TorchServe would hide an ImportError behind its own default handlers.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from serveready import __version__
from serveready.handlers import BUILTINS, builtin
from serveready.handlers.archive import ENTRY_MODULE, LIBRARY_DIR, check_source
from serveready.handlers.base import BatchHandler

from .errors import ArchiverError

#: The library's own handler code, copied into every archive as ``serveready/handlers``.
HANDLERS_DIR = Path(inspect.getfile(BatchHandler)).parent
#: Top-level names a file at an archive's root must not take: the worker imports these.
_TAKEN = {"torch", "ts", "yaml", "PIL", LIBRARY_DIR, "numpy", "onnxruntime", "captum", "requests", "psutil", "packaging", "model_archiver",
          "tokenizers", ENTRY_MODULE}


@dataclass(frozen=True)
class Named:
    """Something a config names in the user's folder: where it is imported from, and the code it needs."""

    written: str
    module: str
    name: str
    obj: Any
    #: (file or folder here, its path inside the archive) for code outside serveready.handlers
    files: tuple[tuple[Path, str], ...] = ()

    @property
    def path(self) -> Path | None:
        """The file or folder the code comes from (None for the library's own)."""
        return self.files[0][0] if self.files else None


@dataclass(frozen=True)
class HandlerEntry(Named):
    """A resolved ``handler.entry``: a BatchHandler subclass."""

    @property
    def handler_class(self) -> type[BatchHandler]:
        return self.obj

    @property
    def class_name(self) -> str:
        return self.name

    @property
    def builtin(self) -> bool:
        return self.module.startswith(f"{LIBRARY_DIR}.handlers")

    @property
    def qualified(self) -> str:
        """``module:Class``, as model-config.yaml's ``serveready.handler`` says it."""
        return f"{self.module}:{self.name}"

    def entry_source(self) -> str:
        """The generated entry module's text."""
        return f'''"""TorchServe's entry point of this archive, written by serveready {__version__}'s archiver.

The handler is {self.module}:{self.name}; its options are model-config.yaml's handler: section.
Before anything else of the archive is imported or loaded, every file is checked against SHA256SUMS.
"""

import os as _os


{check_source()}

_problems = unpacked_problems(_os.path.dirname(_os.path.abspath(__file__)))
del unpacked_problems
if _problems:
    # A RuntimeError: TorchServe reports it as the load failure (ts-manage quotes it).
    raise RuntimeError("this archive failed its integrity check, refusing to load it: " + "; ".join(_problems[:5]))

try:
    from serveready.handlers.torchserve import TorchServeEntry as _Entry
    from {self.module} import {self.name} as _Handler
except Exception as err:
    # Re-raised as a RuntimeError: TorchServe would answer an ImportError by trying its own default
    # handlers, and other errors (a SyntaxError, say) by a dead worker with no reason in its log line.
    raise RuntimeError(f"this archive's handler {self.module}:{self.name} cannot be imported: {{type(err).__name__}}: {{err}}") from err


class {self.name}(_Entry):
    """{self.name} from {self.module}, served by TorchServe through serveready's engine."""

    handler_class = _Handler
'''


def resolve(written: str, root: Path) -> HandlerEntry:
    """Resolve ``handler.entry`` as written in a config under ``root``.

    Raises:
        ArchiverError: no such handler, file or class; not a BatchHandler; code outside the user's folder.
    """
    entry = written.strip()
    if entry in BUILTINS:
        return _builtin(written, builtin(entry))
    target = entry.partition(":")[0]
    if target.endswith(".py") or "/" in target:
        legacy = Path(target).parent.name == "handlers" and Path(target).stem in BUILTINS
        path = (root / target).resolve()
        if legacy and (not path.exists() or path.parent == HANDLERS_DIR.resolve()):
            # The documented form before handlers had names: handlers/tabular.py.
            return _builtin(written, builtin(Path(target).stem))
    elif ":" not in entry:
        raise ArchiverError(
            f"handler.entry {written!r} is not a built-in handler ({', '.join(BUILTINS)}), "
            "a file (my_handler.py) or a module and class (package.module:Class)"
        )
    named = import_named(written, root, "handler.entry", _pick_handler)
    if named.obj.__module__.startswith(f"{LIBRARY_DIR}.handlers"):
        return _builtin(written, named.obj)
    return HandlerEntry(named.written, named.module, named.name, named.obj, named.files)


def _builtin(written: str, cls: type[BatchHandler]) -> HandlerEntry:
    return HandlerEntry(written, cls.__module__, cls.__name__, cls)


Pick = Callable[[ModuleType, str, str], tuple[str, Any]]


def import_named(written: str, root: Path, key: str, pick: Pick, shipped: bool = True) -> Named:
    """Import what ``written`` names (``file.py[:Name]`` or ``package.module:Name``) from the folder ``root``.

    ``pick(module, name, written)`` returns ``(name, object)``: the one the config means (``name`` may be
    empty: the module's only fitting object), or raises ArchiverError saying why none fits. Code that
    is ``shipped`` in the archive must not shadow a module the worker imports; code that is not (a
    training hook) may import the files beside it.
    """
    target, _, name = written.strip().partition(":") if not _is_windows_drive(written.strip()) else (written.strip(), "", "")
    if target.endswith(".py") or "/" in target:
        return _from_file(written, (root / target).resolve(), name, key, pick, shipped)
    return _from_module(written, target, name, root, key, pick)


def _from_file(written: str, path: Path, name: str, key: str, pick: Pick, shipped: bool) -> Named:
    if not path.is_file():
        raise ArchiverError(f"{key} {written!r}: {path} does not exist")
    if shipped:
        check_top_level_name(path.stem, f"{key.split('.')[0]} file {path.name}")
    # A hook is not shipped: a private name per file, so two folders' train.py never meet in sys.modules.
    module_name = path.stem if shipped else f"_serveready_hook_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ArchiverError(f"{key} {written!r}: {path} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    with _imported_as(module_name, module), (_no_path() if shipped else _on_path(path.parent)):
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise ArchiverError(f"{key} {written!r}: importing {path.name} failed: {type(err).__name__}: {err}") from err
        found_name, obj = pick(module, name, written)
    return Named(written, module_name, found_name, obj, ((path, path.name),))


def _from_module(written: str, module_name: str, name: str, root: Path, key: str, pick: Pick) -> Named:
    with _on_path(root):
        try:
            module = importlib.import_module(module_name)
        except Exception as err:
            raise ArchiverError(f"{key} {written!r}: importing {module_name} failed: {type(err).__name__}: {err}") from err
    found_name, obj = pick(module, name, written)
    if getattr(obj, "__module__", "").startswith(f"{LIBRARY_DIR}."):
        return Named(written, obj.__module__, found_name, obj)
    top = module_name.split(".")[0]
    source = Path(inspect.getfile(sys.modules[top]))
    shipped = source.parent if source.name == "__init__.py" else source
    if not shipped.resolve().is_relative_to(root.resolve()):
        raise ArchiverError(f"{key} {written!r}: {top} comes from {shipped}, outside {root}: an archive carries code from your folder only")
    check_top_level_name(top, f"{key.split('.')[0]} module {top}")
    return Named(written, module_name, found_name, obj, ((shipped, shipped.name),))


def _pick_handler(module: ModuleType, class_name: str, written: str) -> tuple[str, Any]:
    if class_name:
        cls = getattr(module, class_name, None)
        if not isinstance(cls, type):
            raise ArchiverError(f"handler.entry {written!r}: no class {class_name!r} there")
    else:
        found = [c for _, c in inspect.getmembers(module, inspect.isclass) if issubclass(c, BatchHandler) and c.__module__ == module.__name__]
        if len(found) != 1:
            names = ", ".join(c.__name__ for c in found) or "none"
            raise ArchiverError(f"handler.entry {written!r}: expected one BatchHandler subclass defined there, found {names}; name it as file.py:Class")
        cls = found[0]
    if not issubclass(cls, BatchHandler):
        raise ArchiverError(f"handler.entry {written!r}: {cls.__name__} is not a subclass of serveready.handlers.BatchHandler")
    if cls.decode is BatchHandler.decode:
        raise ArchiverError(f"handler.entry {written!r}: {cls.__name__} does not define decode(request): it cannot read a request")
    return cls.__name__, cls


def check_top_level_name(name: str, what: str) -> None:
    """Refuse a file whose name, at an archive's root, would shadow a module the worker imports."""
    if name in sys.stdlib_module_names or name in _TAKEN:
        raise ArchiverError(f"{what} would shadow the module {name!r} on the TorchServe worker (archive files sit on its sys.path): rename it")


def _is_windows_drive(entry: str) -> bool:
    return len(entry) > 2 and entry[1] == ":" and entry[2] in "/\\"


@contextmanager
def _imported_as(name: str, module: object) -> Iterator[None]:
    # Registered for good: dataclasses and typing.get_type_hints look the module up by name.
    saved = sys.modules.get(name)
    sys.modules[name] = module  # type: ignore[assignment]
    try:
        yield
    except BaseException:
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved
        raise


@contextmanager
def _no_path() -> Iterator[None]:
    yield


@contextmanager
def _on_path(root: Path) -> Iterator[None]:
    # A file's neighbours import as they will inside the archive (where they sit beside it).
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
