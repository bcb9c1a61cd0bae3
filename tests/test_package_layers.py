"""The package's imports flow one way: a test parses every import in src/lorafit and fails on a
cycle between its packages (and top-level modules), naming the imports that close it."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "lorafit"


def unit_of(module: str) -> str | None:
    """'lorafit.training.loop' -> 'train'; 'lorafit.io' -> 'io'; other packages -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "lorafit" and len(parts) > 1 else None


def package_imports() -> dict[tuple[str, str], str]:
    """(importing unit, imported unit) -> one place where it happens (every import, lazy ones too)."""
    edges: dict[tuple[str, str], str] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        relative = path.relative_to(SOURCE.parent).with_suffix("")
        source_unit = unit_of(".".join(relative.parts))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                targets = {unit_of(names[0])} if node.module != "lorafit" else {unit_of(n) for n in names[1:]}
            elif isinstance(node, ast.Import):
                targets = {unit_of(alias.name) for alias in node.names}
            else:
                continue
            for target in targets - {None, source_unit}:
                edges.setdefault((source_unit, target), f"{path.relative_to(SOURCE)}:{node.lineno}")
    return edges


def find_cycle(edges) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(unit: str) -> list[str] | None:
        state[unit] = 1
        stack.append(unit)
        for nxt in sorted(graph.get(unit, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[unit] = 2
        stack.pop()
        return None

    for unit in sorted(graph):
        if unit not in state and (found := visit(unit)):
            return found
    return None


def test_packages_import_without_cycles():
    edges = package_imports()
    cycle = find_cycle(edges)
    where = [f"{a} -> {b} ({edges[(a, b)]})" for a, b in zip(cycle, cycle[1:])] if cycle else []
    assert cycle is None, "import cycle: " + "; ".join(where)


def test_the_compute_layer_and_the_ground_floor_import_nothing_above_them():
    above = {"training", "evaluation", "adapters", "cli", "api", "serve", "ui"}
    ground = {"config", "config_files", "options", "errors", "io", "home", "integrity", "outputs", "artifacts"}
    for (source, target), where in package_imports().items():
        if source in {"compute", "data", "model"} | ground:
            assert target not in above, f"{source} imports {target} at {where}"
        if source in {"data", "model"} | ground:
            assert target != "compute", f"{source} imports compute at {where}"
        if source in ground:
            assert target not in {"data", "model"}, f"{source} imports {target} at {where}"


def test_only_the_entry_points_import_the_api_and_the_commands():
    for (source, target), where in package_imports().items():
        if target in {"cli", "api"}:
            assert source in {"cli", "__init__", "serve", "ui"}, f"{source} imports {target} at {where}"


def test_the_cycle_finder_finds_a_cycle():  # the check above could not fail without this working
    edges = {("a", "b"): "x", ("b", "c"): "y", ("c", "a"): "z", ("c", "d"): "w"}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({("a", "b"): "x"}) is None
