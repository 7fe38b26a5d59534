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


def _sys_modules_lookup(node) -> str | None:
    """The module name of ``sys.modules["x"]`` or ``sys.modules.get("x")`` (a string constant), else None."""
    def is_sys_modules(n):
        return isinstance(n, ast.Attribute) and n.attr == "modules" and isinstance(n.value, ast.Name) \
            and n.value.id == "sys"

    if isinstance(node, ast.Subscript) and is_sys_modules(node.value):
        key = node.slice
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
          and is_sys_modules(node.func.value) and node.args):
        key = node.args[0]
    else:
        return None
    return key.value if isinstance(key, ast.Constant) and isinstance(key.value, str) else None


def import_graph() -> dict[str, set[str]]:
    """{module: lamina modules it imports}, counting imports anywhere in the file (inside functions too).
    ``from . import x`` counts as an import of ``lamina.x`` when that is a module. Imports of a package's own
    ``__init__`` re-exports are attributed to the package. A lookup ``sys.modules["lamina.x"]`` (or
    ``.get``) is an edge too: it depends on the module as an import does, it only hides it."""
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
            elif (looked := _sys_modules_lookup(node)) is not None and looked.startswith("lamina"):
                if (name, looked) not in ALLOWED_LOOKUPS:  # depends on it at run time as an import does
                    targets.append(looked)
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


# Run-time lookups of a lamina module through sys.modules that the house allows, each with its reason.
ALLOWED_LOOKUPS = {
    # the deprecated Module.predict shim (kept for one release) calls lm.predict, which stands above
    # module.py; remove this line with the shim
    ("lamina.module", "lamina.train"),
}


def lookups() -> set[tuple[str, str]]:
    """Every ``(module, lamina module it looks up in sys.modules)`` in the package."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            looked = _sys_modules_lookup(node)
            if looked is not None and looked.startswith("lamina"):
                found.add((_module_name(path), looked))
    return found


def test_the_lookup_finder_sees_both_forms():
    tree = ast.parse('import sys\nsys.modules["lamina.a"]\nsys.modules.get("lamina.b")\nsys.modules.get("torch")')
    assert sorted(x for n in ast.walk(tree) if (x := _sys_modules_lookup(n))) == ["lamina.a", "lamina.b", "torch"]


def test_sys_modules_lookups_of_lamina_modules_are_only_the_allowed_ones():
    extra = lookups() - ALLOWED_LOOKUPS
    assert not extra, (f"{sorted(extra)} look up lamina modules in sys.modules: that is an import edge in "
                       "disguise (an arrow up, or a cycle); import the module, or pass what is needed down")


# Files outside backends/ and training/ that may name a framework, with the reason.
FRAMEWORKS = ("torch", "jax", "jaxlib", "tensorflow")


def framework_imports(path: Path) -> set[str]:
    """The frameworks (torch, jax, jaxlib, tensorflow) a file imports, anywhere in it, or reads from
    ``sys.modules``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        elif (looked := _sys_modules_lookup(node)) is not None:
            names = [looked]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in FRAMEWORKS}
    return found


def test_only_backends_and_training_rooms_import_a_framework():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        if rel[0] in ("backends", "training"):
            continue
        found = framework_imports(path)
        if found:
            offenders["/".join(rel)] = sorted(found)
    assert not offenders, (f"{offenders} import a framework: only backends/ and the per-backend rooms of "
                           "training/ know which backend is which (DESIGN.md, rule 2); move that code into a room")


def test_the_framework_finder_sees_imports_and_lookups():
    assert framework_imports(PACKAGE / "training" / "torch_dist.py") == {"torch"}
    assert framework_imports(PACKAGE / "training" / "jax_dist.py") == {"jax"}
