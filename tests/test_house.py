"""The shape of the house, checked from the source with `ast`: no import cycle among the modules of autotune,
profilers and search_spaces, nor among their folders (function-level imports included, since hiding an import
in a function does not remove the cycle), and the arrows go one way: profilers and search_spaces never import
autotune.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("autotune", "profilers", "search_spaces")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body. `from p import m` counts the module p.m when m is
    one, and p itself only for names its __init__ provides; the implicit import of parent packages is no edge."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found |= submodules
            if len(submodules) < len(node.names):  # a name the package's __init__ provides: it is imported
                found.add(base)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    paths = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    known = {module_name(p) for p in paths}
    graph = {module_name(p): imported_modules(p, known) for p in paths}
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py first; a package's own __init__ is not its child's import.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle to break."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def through_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph with every import of a package replaced by what its __init__ imports (which is what importing it
    runs), and the package nodes themselves left out: a child's implicit import of its parent package is not an
    edge, but an explicit `from package import name` in a child the package imports is a real cycle."""
    packages = {name for name in graph if (ROOT / Path(*name.split(".")) / "__init__.py").exists()}

    def expand(targets: set[str], seen: frozenset[str] = frozenset()) -> set[str]:
        out: set[str] = set()
        for target in targets:
            if target in packages:
                if target not in seen:
                    out |= expand(graph[target], seen | {target})
            else:
                out.add(target)
        return out

    return {name: expand(targets) for name, targets in graph.items() if name not in packages}


def test_no_import_cycle_among_the_three_packages() -> None:
    assert cycles(through_packages(import_graph())) == []


def folder_of(module: str) -> str:
    """The sub-package a module lives in (autotune.compress.pruning -> autotune.compress), else the module."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def test_no_import_cycle_among_folders() -> None:
    # A cycle between sub-packages (compress -> runtime -> compress) is one even when no two modules form it.
    folders: dict[str, set[str]] = {}
    for name, targets in through_packages(import_graph()).items():
        folders.setdefault(folder_of(name), set()).update(folder_of(t) for t in targets if folder_of(t) != folder_of(name))
    assert cycles(folders) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_profilers_and_search_spaces_never_import_autotune() -> None:
    graph = import_graph()
    wrong_way = {name: sorted(t for t in targets if t.split(".")[0] == "autotune")
                 for name, targets in graph.items() if name.split(".")[0] in ("profilers", "search_spaces")}
    assert {name: targets for name, targets in wrong_way.items() if targets} == {}
