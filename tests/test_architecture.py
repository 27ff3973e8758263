"""The package's shape (issue 13): its import graph is acyclic — `TYPE_CHECKING` and function-local imports
counted, since they hide a cycle rather than remove it — and the installed package does not import bench/."""

from __future__ import annotations

import ast
from pathlib import Path

import sidecar

PACKAGE = Path(sidecar.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str], name: str | None = None) -> set[str]:
    """Every sidecar module this file (the module `name`, by default the one its path says) imports, wherever
    the import statement stands."""
    found: set[str] = set()
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports; importing `a.b.c` also runs `a` and `a.b` first."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {name: imports_of(path, modules) - {name} for name, path in files.items()}
    for name in modules:
        parts = name.split(".")
        graph[name] |= {".".join(parts[:i]) for i in range(1, len(parts))} & modules
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycle() -> None:
    """No module of the package reaches itself through imports of any kind."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_planted_cycle() -> None:
    """The checker itself catches a cycle, so the test above can fail."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_local_and_type_checking_imports_count(tmp_path: Path) -> None:
    """An import inside a function or under `if TYPE_CHECKING:` is an edge of the graph."""
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sidecar import errors\n"
                      "def f():\n    from sidecar.proxy import gateway\n")
    assert imports_of(source, {"sidecar.errors", "sidecar.proxy.gateway", "sidecar.proxy"}, "sidecar.m") == {
        "sidecar.errors", "sidecar.proxy.gateway", "sidecar.proxy"}


def test_installed_package_does_not_import_bench() -> None:
    """bench/ is not shipped: nothing in the package imports it."""
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("bench"), f"{path} imports {node.module}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("bench") for a in node.names), path
