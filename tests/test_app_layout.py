"""The iMAML application's modules import one way: no cycle among ``applications/imaml/*.py``.

The import graph is read from the source with :mod:`ast` (nothing is imported). An edge
``a -> b`` means module ``a`` has an ``import`` naming module ``b`` of the package. Two graphs
are checked: the module-level imports (what runs when a module is imported) and every import,
including those inside functions (which the app uses to defer PIL, fontTools and
``torch.distributed``): a cycle through a deferred import is still two modules that each need
the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "applications.imaml"
ROOT = Path(__file__).resolve().parents[1] / "applications" / "imaml"
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def _targets(node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package's modules an import statement names (``__init__`` for the package)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif node.level == 0:
        base = node.module or ""
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    elif node.level == 1 and node.module is None:  # from . import x
        names = [f"{PACKAGE}.{alias.name}" for alias in node.names]
    elif node.level == 1:  # from .x import y
        base = f"{PACKAGE}.{node.module}"
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    else:  # from .. import: outside the package
        return set()
    found = set()
    for name in names:
        if name == PACKAGE:
            found.add("__init__")
        elif name.startswith(PACKAGE + "."):
            stem = name[len(PACKAGE) + 1 :].split(".")[0]
            if stem in MODULES:
                found.add(stem)
    return found


def _module_level(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports executed at import time: the module body, through if/try/with, not defs."""
    out: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.If | ast.With | ast.Try):
            for field in ("body", "orelse", "finalbody", "handlers"):
                stack.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            stack.extend(node.body)
    return out


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    graph = {}
    for stem in MODULES:
        tree = ast.parse((ROOT / f"{stem}.py").read_text(encoding="utf-8"))
        if module_level_only:
            nodes = _module_level(tree)
        else:
            nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
        graph[stem] = set().union(*(_targets(n) for n in nodes)) - {stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level", "all"])
def test_imaml_imports_are_acyclic(module_level_only):
    graph = import_graph(module_level_only)
    assert {"tasks", "datasets", "inner", "learners", "one_shot"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in applications/imaml: " + " -> ".join(cycle or [])


def test_layers_point_one_way():
    graph = import_graph(module_level_only=False)
    # The task interface and sampler know no dataset; the readers build on it.
    assert graph["tasks"] == set()
    assert "tasks" in graph["omniglot"] and "tasks" in graph["glyphs"]
    assert graph["datasets"] >= {"tasks", "glyphs", "omniglot", "sinusoid"}
    assert graph["one_shot"] >= {"omniglot", "tasks"}
    # Inner solvers below the learners; meta only re-exports the two.
    assert "learners" not in graph["inner"]
    assert "inner" in graph["learners"]
    assert graph["meta"] == {"inner", "learners"}
    # Nothing in the package imports the compatibility module.
    assert not [m for m, targets in graph.items() if "meta" in targets]
