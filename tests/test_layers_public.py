"""Lamina's own layers are written with the public API alone (DESIGN.md, rule 2; issue 8, item 3).

Every file under ``src/lamina/layers/`` is parsed: it may not import a name starting with ``_`` from
another module, nor read an attribute starting with ``_`` that the file itself does not define (dunder
names such as ``__init__`` and ``__dict__`` are fine; ``self._x`` that the layer assigns itself is fine).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

LAYERS = pathlib.Path(__file__).resolve().parents[1] / "src" / "lamina" / "layers"
FILES = sorted(LAYERS.glob("*.py"))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def defined_names(tree: ast.AST) -> set[str]:
    """Names the file defines itself: functions, classes, assigned names and attributes, and keys it
    stores through ``__dict__[...]``."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Attribute) and node.value.attr == "__dict__"
              and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            out.add(node.slice.value)
        elif isinstance(node, ast.alias) and node.asname:  # `import x as _x`: the alias is the file's own
            out.add(node.asname)
    return out


def private_uses(source: str) -> list[str]:
    """Every private name of another module that ``source`` uses, as 'line N: what'."""
    tree = ast.parse(source)
    own = defined_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                if _is_private(a.name):
                    found.append(f"line {node.lineno}: imports {a.name} from {'.' * node.level}{node.module or ''}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if any(_is_private(part) for part in a.name.split(".")):
                    found.append(f"line {node.lineno}: imports {a.name}")
        elif isinstance(node, ast.Attribute) and _is_private(node.attr) and node.attr not in own:
            found.append(f"line {node.lineno}: uses .{node.attr}")
        elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
              and node.value.attr == "__dict__" and isinstance(node.slice, ast.Constant)
              and isinstance(node.slice.value, str) and _is_private(node.slice.value)
              and node.slice.value not in own):
            found.append(f"line {node.lineno}: reads __dict__[{node.slice.value!r}]")
    return found


def test_the_checker_catches_private_uses():
    bad = ("from ..ops import _tuple\n"
           "class A:\n"
           "    def f(self, x):\n"
           "        self._mine = 1\n"
           "        return self._backend.relu(x), self._mine, x.__class__, self.__dict__['_params']\n")
    found = private_uses(bad)
    assert any("_tuple" in f for f in found)
    assert any("._backend" in f for f in found)
    assert any("_params" in f for f in found)
    assert not any("_mine" in f or "__class__" in f for f in found)


def test_layer_files_are_found():
    assert len(FILES) > 10 and any(f.name == "recurrent.py" for f in FILES)


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_layer_uses_only_public_names(path):
    found = private_uses(path.read_text())
    assert not found, (f"{path.name} reaches through private doors (built-in layers use only the public API: "
                       f"lm.ops, public Module/Parameter methods, lamina.errors/init/random):\n  "
                       + "\n  ".join(found))
