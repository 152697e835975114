"""The floors of the package, checked: scripts -> archiver -> handlers, never upward, no cycles; light CLIs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

#: each layer's folder in the repository, and the layers it may import (its own included)
#: hosts: the modules at the package's top (serveready.hosting, .kserve, .ray): other servers, on the handler core only
LAYERS = {"handlers": {"handlers"}, "archiver": {"archiver", "handlers"}, "scripts": {"scripts", "archiver", "handlers"},
          "hosts": {"hosts", "handlers"}}
FOLDERS = {"handlers": ROOT / "handlers", "archiver": ROOT / "archiver", "scripts": ROOT / "scripts", "hosts": ROOT / "serveready"}
HOSTS = {"hosting", "kserve", "_kserve_server", "ray"}


def _imports(path: Path, layer: str, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(module of serveready imported, line) for every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    package = ["serveready"] if layer == "hosts" else ["serveready", layer]
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("serveready")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("serveready"):
                names = [f"{module}.{a.name}" if module in ("serveready", ".".join(package)) and not node.module else module for a in node.names]
                found += [(name, node.lineno) for name in names]
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in HOSTS:
        return "hosts"
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_layer_imports_one_above_it() -> None:
    wrong = []
    for layer, folder in FOLDERS.items():
        for path in sorted(folder.glob("*.py")):
            for module, line in _imports(path, layer):
                target = _layer(module)
                if target is not None and target not in LAYERS[layer]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({layer} may import {', '.join(sorted(LAYERS[layer]))})")
    assert wrong == []


def test_the_hosts_stand_on_the_handler_core_only(tmp_path: Path) -> None:
    """serveready.kserve and serveready.ray import the handler core and each other, never the archiver or the scripts
    (a host serves built archives); and nothing below imports them."""
    bad = tmp_path / "bad.py"
    bad.write_text("from . import hosting\nfrom .handlers.host import load\nfrom .archiver import build\n")
    assert [_layer(m) for m, _ in _imports(bad, "hosts")] == ["hosts", "handlers", "archiver"]
    hosts = [m for layer in ("handlers", "archiver", "scripts") for path in FOLDERS[layer].glob("*.py") for m, _ in _imports(path, layer)
             if _layer(m) == "hosts"]
    assert hosts == []


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The check above can fail: a handler module importing the archiver, relatively or not, is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ..archiver import build\nimport serveready.scripts.client\n\ndef f():\n    from serveready.archiver.spec import load_spec\n")
    assert [_layer(m) for m, _ in _imports(bad, "handlers")] == ["archiver", "scripts", "archiver"]


def test_modules_import_each_other_without_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for layer, folder in FOLDERS.items():
        for path in folder.glob("*.py"):
            name = (f"serveready.{path.stem}" if layer == "hosts" else f"serveready.{layer}.{path.stem}").removesuffix(".__init__")
            graph[name] = {m for m, _ in _imports(path, layer, top_level_only=True) if m in graph or _layer(m)}
    known = set(graph)
    graph = {k: {m for m in v if m in known and m != k} for k, v in graph.items()}
    assert sum(map(len, graph.values())) > 40  # the graph was read, not empty
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]  # and the check finds one where there is one


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*trail[trail.index(nxt):], nxt]) if nxt in trail else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def _imported_by(code: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_the_management_tools_start_without_torch() -> None:
    """ts-server, ts-manage and ts-explain import neither torch nor numpy, Pillow or the model archiver."""
    loaded = _imported_by("import serveready.scripts.manage, serveready.scripts.server, serveready.scripts.explain")
    assert not {"torch", "numpy", "PIL", "model_archiver"} & loaded
    assert "serveready.handlers.archive" in loaded  # they do read archives


def test_load_imports_neither_the_archiver_nor_the_scripts(net_archive: Path) -> None:
    loaded = _imported_by(f"import serveready\nmodel = serveready.load({str(net_archive)!r})\nassert model.predict({{'inputs': [0.0] * 10}}).ok")
    assert not {m for m in loaded if m.startswith(("serveready.archiver", "serveready.scripts", "model_archiver"))}
