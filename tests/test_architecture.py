"""The house rules that can be checked by reading the code (DESIGN.md, "Architecture")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lamina"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
    """{module: lamina modules it imports}, counting imports anywhere in the file (inside functions too).
    ``from . import x`` counts as an import of ``lamina.x`` when that is a module. Imports of a package's own
    ``__init__`` re-exports are attributed to the package."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _resolve(name, is_package, node.level, node.module)
                elif node.module and node.module.startswith("lamina"):
                    base = node.module
                else:
                    continue
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files]
                targets += subs if len(subs) == len(node.names) else [base, *subs]
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names if a.name.startswith("lamina")]
            for t in targets:
                if t in files and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None. A package importing its own submodules
    (``lamina`` -> ``lamina.x``, ``lamina.ops`` -> ``lamina.ops.nn``) is how re-exports work and is not an
    edge back up unless the submodule imports the package."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("room", ["lamina.module", "lamina.parameter", "lamina.tree", "lamina.explain",
                                  "lamina.statedict", "lamina.summary", "lamina.functional"])
def test_the_model_layer_imports_neither_training_nor_checkpoints(room):
    graph = import_graph()
    reach, todo = set(), [room]
    while todo:  # everything the room imports, directly or not
        for m in graph[todo.pop()]:
            if m not in reach:
                reach.add(m)
                todo.append(m)
    above = {m for m in reach if m.split(".")[1] in ("train", "training", "checkpoint", "optim", "losses")}
    assert not above, f"{room} imports {sorted(above)}"


def test_backend_adapters_hold_no_training_code():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("lamina.backends"):
            above = sorted(d for d in deps if not d.startswith(("lamina.backends", "lamina.errors")))
            assert not above, f"{name} imports {above}: adapters stand on the ground (errors) only"
