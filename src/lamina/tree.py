"""Traversal of a module tree: parameters, buffers and modules with their dotted paths, each shared one once.

A tree is flattened once into an ``Index`` and the index is cached on the root module until any tree's
structure changes (``context.structure_version``). ``named_parameters``, ``state_dict``, the load plan,
pure calls and train steps all read the same index, so a parameter has one identity everywhere: the first
dotted path under which the traversal meets it (DESIGN.md, rule 5). Paths also name modules in errors:
``path_of`` walks up the parent links that registration records.
"""

from __future__ import annotations

from . import context
from .errors import ModuleError

__all__ = ["Index", "index", "path_of", "root_of"]


class Index:
    """A module tree flattened once: deduplicated parameters, buffers and modules with their paths."""

    __slots__ = ("version", "entries", "modules", "paths", "built")

    def __init__(self, root):
        self.version = context.structure_version()
        self.built = False  # set by Module._needs_build once every module and parameter is built (it stays so
        # until the structure changes, which makes a new index)
        self.entries: list = []  # (path, Parameter) for parameters and buffers, first path of each
        self.modules: list = []  # (path, Module), pre-order, each once
        self.paths: dict = {}  # every path, aliases of tied parameters included
        seen_p: set[int] = set()
        seen_m: set[int] = set()

        def visit(m, prefix: str, stack: tuple) -> None:
            if id(m) in stack:
                raise ModuleError(f"module '{prefix.rstrip('.')}' ({type(m).__name__}) contains itself")
            if id(m) not in seen_m:
                seen_m.add(id(m))
                self.modules.append((prefix.rstrip("."), m))
            for name, p in m._params.items():
                path = prefix + name
                self.paths[path] = p
                if id(p) not in seen_p:
                    seen_p.add(id(p))
                    self.entries.append((path, p))
            for name, child in m._modules.items():
                visit(child, f"{prefix}{name}.", stack + (id(m),))

        visit(root, "", ())


def index(module) -> Index:
    """The (cached) index of the tree under ``module``."""
    d = module.__dict__
    idx = d["_cache"]
    if idx is None or idx.version != context.structure_version():
        idx = Index(module)
        d["_cache"] = idx
    return idx


def root_of(module):
    """The outermost module above ``module`` (following the first live parent link at each step)."""
    m, seen = module, {id(module)}
    while True:
        parent = next((r() for r, _ in m._parents if r() is not None), None)
        if parent is None or id(parent) in seen:
            return m
        seen.add(id(parent))
        m = parent


def path_of(chain: list) -> str:
    """The dotted path of ``chain[0]``: through the modules in ``chain`` (innermost first, as a call
    passed through them), then up the parent links from the last one."""
    names = []
    for inner, outer in zip(chain, chain[1:]):
        name = next((n for n, c in outer._modules.items() if c is inner), None)
        names.append("?" if name is None else name)
    m = chain[-1]
    seen = {id(m)}
    while True:
        up = next(((r(), n) for r, n in m._parents if r() is not None), None)
        if up is None or id(up[0]) in seen:
            break
        seen.add(id(up[0]))
        names.append(up[1])
        m = up[0]
    return ".".join(reversed(names))
