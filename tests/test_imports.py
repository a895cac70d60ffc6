"""Dependencies point one way: no cycle among the harness's modules, counting imports
inside functions too (a late import that dodges a cycle hides a module in the wrong place)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "harness"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness"):
                out.add(node.module)
                out |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.startswith("harness")}
        # importing a.b.c runs the packages a.b and a first
        for target in list(out):
            parts = target.split(".")
            out |= {".".join(parts[:i]) for i in range(2, len(parts))}
        graph[name] = {t for t in out if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert "harness.run.loop" in graph and "harness.methods.dno" in graph  # the walk found the package
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# harness/'s packages and top-level modules, lowest first: each imports only from rows above its own
LAYERS = [
    {"fmt", "metrics", "lifeline"},
    {"store", "console"},
    {"tiny"},
    {"models"},
    {"config"},
    {"engines"},
    {"judges"},
    {"evaluate", "methods", "train"},
    {"report"},
    {"run"},
    {"validate"},
    {"export"},
    {"cli_run"},
    {"cli"},
]


def unit(module: str) -> str:
    """The package or top-level module of harness/ that ``module`` belongs to."""
    return module.split(".")[1] if "." in module else module


def arrows_up(graph: dict[str, set[str]], layers: list[set[str]]) -> list[tuple[str, str]]:
    """Every import from a unit's own row or a row below it (an arrow sideways or back up)."""
    row = {u: i for i, units in enumerate(layers) for u in units}
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if "." in a and "." in b and unit(a) != unit(b) and row[unit(b)] >= row[unit(a)])


def test_packages_import_only_the_layers_below():
    graph = import_graph()
    assert {unit(m) for m in graph if "." in m} == set().union(*LAYERS)  # every package has its row
    assert arrows_up(graph, LAYERS) == []


def test_the_layer_check_finds_an_arrow_up():
    graph = {"harness.store.files": {"harness.config.schema"}, "harness.config.schema": set(),
             "harness.run.loop": {"harness.methods.base"}, "harness.methods.base": set()}
    assert arrows_up(graph, [{"store"}, {"config"}, {"methods"}, {"run"}]) == [("harness.store.files",
                                                                                 "harness.config.schema")]
