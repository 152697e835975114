"""Which handler a model config names, and what its archive must carry to import it on a plain host.

``handler.entry`` takes three forms:

    tabular, image_classifier          a built-in handler, by name
    my_handler.py[:Class]              a file in the user's folder (relative to it)
    package.module:Class               a module of the user's folder, importable from it

Every archive gets the same small generated entry module (:data:`ENTRY_MODULE`) that
imports the handler class from the archive's own copy of the code: TorchServe wants
exactly one class in the module it imports, and would hide an ImportError behind its
own default handlers.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from serveready import __version__
from serveready.handlers import BUILTIN_HANDLERS, BatchHandler

from .errors import ArchiverError
from .integrity import check_source

#: The module TorchServe imports from every archive.
ENTRY_MODULE = "serveready_entry"
#: The library's own handler code, copied into every archive as ``serveready/handlers``.
HANDLERS_DIR = Path(inspect.getfile(BatchHandler)).parent
#: Top-level names a file at an archive's root must not take: the worker imports these.
_TAKEN = {"torch", "ts", "yaml", "PIL", "serveready", "numpy", "onnxruntime", "captum", "requests", "psutil", "packaging", "model_archiver", ENTRY_MODULE}


@dataclass(frozen=True)
class HandlerEntry:
    """A resolved ``handler.entry``: the class, where the archive imports it from, and the files it needs."""

    written: str
    module: str
    class_name: str
    handler_class: type[BatchHandler]
    #: (file or folder here, its path inside the archive) for code outside serveready.handlers
    files: tuple[tuple[Path, str], ...] = ()

    @property
    def builtin(self) -> bool:
        return self.module.startswith("serveready.handlers")

    def entry_source(self) -> str:
        """The generated entry module's text."""
        return f'''"""TorchServe's entry point of this archive, written by serveready {__version__}'s archiver.

The handler is {self.module}:{self.class_name}; its options are model-config.yaml's handler: section.
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
    from {self.module} import {self.class_name} as _Handler
except Exception as err:
    # Re-raised as a RuntimeError: TorchServe would answer an ImportError by trying its own default
    # handlers, and other errors (a SyntaxError, say) by a dead worker with no reason in its log line.
    raise RuntimeError(f"this archive's handler {self.module}:{self.class_name} cannot be imported: {{type(err).__name__}}: {{err}}") from err


class {self.class_name}(_Handler):
    """{self.class_name} from {self.module}, with this archive's options."""
'''


def resolve(written: str, root: Path) -> HandlerEntry:
    """Resolve ``handler.entry`` as written in a config under ``root``.

    Raises:
        ArchiverError: no such handler, file or class; not a BatchHandler; code outside the user's folder.
    """
    entry = written.strip()
    if entry in BUILTIN_HANDLERS:
        return _builtin(written, BUILTIN_HANDLERS[entry])
    target, _, class_name = entry.partition(":") if not _is_windows_drive(entry) else (entry, "", "")
    if target.endswith(".py") or "/" in target:
        path = (root / target).resolve()
        legacy = Path(target).parent.name == "handlers" and Path(target).stem in BUILTIN_HANDLERS
        if legacy and (not path.exists() or path.parent == HANDLERS_DIR.resolve()):
            # The documented form before handlers had names: handlers/tabular.py.
            return _builtin(written, BUILTIN_HANDLERS[Path(target).stem])
        return _from_file(written, path, class_name)
    if not class_name:
        raise ArchiverError(
            f"handler.entry {written!r} is not a built-in handler ({', '.join(BUILTIN_HANDLERS)}), "
            "a file (my_handler.py) or a module and class (package.module:Class)"
        )
    return _from_module(written, target, class_name, root)


def _builtin(written: str, cls: type[BatchHandler]) -> HandlerEntry:
    return HandlerEntry(written, cls.__module__, cls.__name__, cls)


def _from_file(written: str, path: Path, class_name: str) -> HandlerEntry:
    if not path.is_file():
        raise ArchiverError(f"handler.entry {written!r}: {path} does not exist")
    check_top_level_name(path.stem, f"handler file {path.name}")
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ArchiverError(f"handler.entry {written!r}: {path} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    with _imported_as(name, module):
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise ArchiverError(f"handler.entry {written!r}: importing {path.name} failed: {type(err).__name__}: {err}") from err
        cls = _pick_class(module, class_name, written)
    return HandlerEntry(written, name, cls.__name__, cls, ((path, path.name),))


def _from_module(written: str, module_name: str, class_name: str, root: Path) -> HandlerEntry:
    with _on_path(root):
        try:
            module = importlib.import_module(module_name)
        except Exception as err:
            raise ArchiverError(f"handler.entry {written!r}: importing {module_name} failed: {type(err).__name__}: {err}") from err
    cls = _pick_class(module, class_name, written)
    if cls.__module__.startswith("serveready.handlers"):
        return _builtin(written, cls)
    top = module_name.split(".")[0]
    source = Path(inspect.getfile(sys.modules[top]))
    shipped = source.parent if source.name == "__init__.py" else source
    if not shipped.resolve().is_relative_to(root.resolve()):
        raise ArchiverError(f"handler.entry {written!r}: {top} comes from {shipped}, outside {root}: an archive carries code from your folder only")
    check_top_level_name(top, f"handler module {top}")
    return HandlerEntry(written, module_name, cls.__name__, cls, ((shipped, shipped.name),))


def _pick_class(module: object, class_name: str, written: str) -> type[BatchHandler]:
    if class_name:
        cls = getattr(module, class_name, None)
        if not isinstance(cls, type):
            raise ArchiverError(f"handler.entry {written!r}: no class {class_name!r} there")
    else:
        found = [c for _, c in inspect.getmembers(module, inspect.isclass) if issubclass(c, BatchHandler) and c.__module__ == module.__name__]  # type: ignore[attr-defined]
        if len(found) != 1:
            names = ", ".join(c.__name__ for c in found) or "none"
            raise ArchiverError(f"handler.entry {written!r}: expected one BatchHandler subclass defined there, found {names}; name it as file.py:Class")
        cls = found[0]
    if not issubclass(cls, BatchHandler):
        raise ArchiverError(f"handler.entry {written!r}: {cls.__name__} is not a subclass of serveready.handlers.BatchHandler")
    missing = [m for m in ("decode", "encode") if getattr(cls, m) is getattr(BatchHandler, m)]
    if missing:
        raise ArchiverError(f"handler.entry {written!r}: {cls.__name__} does not define {' and '.join(missing)}: it cannot answer a request")
    return cls


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
def _on_path(root: Path) -> Iterator[None]:
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
