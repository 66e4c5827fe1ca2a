"""The import graph of pipeline/: no cycle, and nothing in core/ reaches up into another package (core is what
every stage stands on). Imports inside functions count: they close cycles as well."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_of(p): p for p in PIPELINE.rglob("*.py")}


def imports(module: str) -> set[str]:
    """The pipeline modules `module` imports (a name imported from a package that is a module: that module)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
    return found & set(MODULES)


GRAPH = {module: imports(module) for module in MODULES}


def cycles() -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
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
            if len(component) > 1 or v in GRAPH[v]:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles() == []


def test_a_cycle_would_be_found():
    """The check itself: two modules importing each other are a cycle."""
    GRAPH["pipeline.core.errors"].add("pipeline.core.cli")
    try:
        assert any({"pipeline.core.cli", "pipeline.core.errors"} <= set(cycle) for cycle in cycles())
    finally:
        GRAPH["pipeline.core.errors"].discard("pipeline.core.cli")


def test_core_imports_nothing_from_another_package():
    upward = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() if m.startswith("pipeline.core")
                    for d in deps if not d.startswith("pipeline.core"))
    assert upward == []
