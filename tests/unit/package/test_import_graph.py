"""Every module imports on its own, and the package's import graph has no cycle.

The graph is built from the modules' source (module-level and function-level imports
alike; ``if TYPE_CHECKING:`` blocks excluded, they never run), so a cycle hidden
behind a lazy import inside a function is caught too.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import lloco_index

PACKAGE = "lloco_index"
ROOT = Path(lloco_index.__file__).parent


def _modules() -> dict[str, Path]:
    found = {PACKAGE: ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix=f"{PACKAGE}."):
        spec = importlib.util.find_spec(info.name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            found[info.name] = Path(spec.origin)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rsplit(".", 1)[0]
    targets: set[str] = set()

    def resolve(module: str) -> None:
        # The deepest package module a dotted name lies in ("a.b.func" -> "a.b").
        while module and module not in known:
            module = module.rpartition(".")[0]
        if module and module != name:
            targets.add(module)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE):
                    resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith(PACKAGE):
                for alias in node.names:
                    candidate = f"{module}.{alias.name}"
                    resolve(candidate if candidate in known else module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


def test_finder_sees_a_cycle():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert find_cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_graph_includes_function_level_imports():
    graph = import_graph()
    # compressors/loading.py imports its compressor classes inside _registry().
    assert "lloco_index.compressors.icae" in graph["lloco_index.compressors.loading"]


def test_no_import_cycle():
    assert find_cycles(import_graph()) == []


@pytest.mark.parametrize("name", sorted(_modules()))
def test_every_module_imports(name):
    optional = {"lloco_index.serving.vllm_backend"}
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if name in optional and "vllm" in str(exc):
            pytest.skip(f"{name} needs vllm: {exc}")
        raise
