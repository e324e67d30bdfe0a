"""The import graph of ``branchnet`` runs one way: no circles, analysis never reaches virtual.

The graph is read from the source with :mod:`ast`, not by importing: every ``import`` of a
``branchnet.*`` module counts, at module level and inside functions alike (a lazy import that
goes back up the graph is still a circle), except under ``if TYPE_CHECKING:``, which never runs.

Edges:

* ``import branchnet.p.q`` and ``from branchnet.p.q import name`` add ``m -> branchnet.p.q``
  (``branchnet.p.q.name`` instead when ``name`` is a submodule). A package stands for its
  ``__init__``.
* Only the module named is the target, not the parent packages that Python runs first:
  ``from branchnet.data.dataset import Split`` adds ``m -> branchnet.data.dataset``, not
  ``m -> branchnet.data``. Otherwise every package ``__init__`` that re-exports its submodules
  would close a circle with each of them, and every module would depend on ``branchnet``
  itself. An import that names the package itself (``from branchnet.data import Data``,
  ``from branchnet import data``) does add the edge to the package ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "branchnet"

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree``, at any depth, outside ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` in ``module`` reads from."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[tuple[str, str | None]]:
    """(target module, name imported from it or None) for each branchnet module imported."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names if a.name.split(".")[0] == "branchnet"]
    source = _resolve(module, node)
    if source.split(".")[0] != "branchnet":
        return []
    out: list[tuple[str, str | None]] = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        out.append((sub, None) if sub in MODULES else (source, alias.name))
    return out


def _edges() -> dict[str, dict[str, list[tuple[int, str | None]]]]:
    """module -> imported module -> [(line, name imported or None)]."""
    graph: dict[str, dict[str, list[tuple[int, str | None]]]] = {m: {} for m in MODULES}
    for module, path in MODULES.items():
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target, name in _targets(module, node):
                assert target in MODULES, f"{path}:{node.lineno} imports {target}, which does not exist"
                graph[module].setdefault(target, []).append((node.lineno, name))
    return graph


GRAPH = _edges()


def _cycles() -> list[list[str]]:
    """Every elementary circle of the graph, as a chain that ends where it starts."""
    try:
        import networkx as nx
    except ImportError:  # networkx is optional: not a dependency of branchnet
        return _dfs_cycles()
    g = nx.DiGraph([(a, b) for a, targets in GRAPH.items() for b in targets])
    return sorted([*c, c[0]] for c in nx.simple_cycles(g))


def _dfs_cycles() -> list[list[str]]:
    """The circles a depth-first search closes (at least one per circular component)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                out.append([*stack[stack.index(t):], t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    return out


def _chain(cycle: list[str]) -> str:
    return " -> ".join(cycle)


def test_every_module_is_parsed_and_imports_resolve():
    assert "branchnet" in MODULES and "branchnet.data.dataset" in MODULES
    assert "branchnet.data" in GRAPH["branchnet"]


def test_no_import_cycles():
    cycles = _cycles()
    assert not cycles, "import cycles:\n" + "\n".join(_chain(c) for c in cycles)


def test_from_branchnet_import_names_only_submodules():
    """``from branchnet import X`` is for submodules; a name defined in ``branchnet/__init__``
    (``__version__``, a re-exported class) is imported from the module that defines it."""
    bad = [f"{MODULES[m].relative_to(SRC)}:{line} imports {name!r} from branchnet"
           for m, targets in GRAPH.items() if m != "branchnet"
           for line, name in targets.get("branchnet", []) if name is not None]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("branchnet.analysis")))
def test_analysis_does_not_import_virtual(module):
    bad = [f"line {line}: {t}" for t, uses in GRAPH[module].items()
           if t == "branchnet.virtual" or t.startswith("branchnet.virtual.") for line, _ in uses]
    assert not bad, f"{module} imports branchnet.virtual: {bad}"



def test_top_level_imports_every_subpackage():
    """``import branchnet as bn`` gives ``bn.analysis``, ``bn.virtual``, ``bn.plastic``, ..."""
    subpackages = {m for m, p in MODULES.items() if m.count(".") == 1 and p.name == "__init__.py"}
    assert {"branchnet.virtual", "branchnet.plastic"} <= subpackages
    missing = sorted(subpackages - set(GRAPH["branchnet"]))
    assert not missing, f"branchnet/__init__.py does not import {missing}"
