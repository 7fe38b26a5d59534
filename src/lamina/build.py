"""The build protocol: a layer's ``build(self, input_shape)`` hook runs once, before the first forward, and
parameter values are drawn when their full paths are known.

``Module.build`` / the first call run ``run_build`` on each module; a hook that raises is undone
(``undo_build``), so a half-built layer is never left behind. ``super().build(shape)`` inside a hook runs
the next hook up the class hierarchy (``run_hook_after``). ``draw_parameters`` gives every built parameter
without a value its values, each from the random stream of its dotted path in the outermost module, so one
seed gives the same weights whatever the build order and on every backend.
"""

from __future__ import annotations

from . import context, init
from .errors import UninitializedParameterError
from .parameter import _fmt_shape
from .tree import index, root_of

__all__ = ["run_build", "undo_build", "call_hook", "run_hook_after", "draw_parameters", "reinitialize"]


def run_build(m, shapes: list) -> None:
    cls = next((c for c in type(m).__mro__ if "_build_hook" in c.__dict__), None)
    if cls is not None and cls.__dict__["_build_hook"] is not None:
        params, modules = dict(m._params), dict(m._modules)
        declared = {id(p): p.shape for p in params.values()}
        try:
            call_hook(m, cls, shapes)
        except BaseException:  # a build that fails halfway leaves the layer as it was before it
            undo_build(m, params, modules, declared)
            raise
    for name, p in m._params.items():
        if not p.is_built:
            raise UninitializedParameterError(
                f"{type(m).__name__} declared parameter '{name}' with shape {_fmt_shape(p.shape)} but "
                f"{'its build() did not give it a full shape' if cls else 'defines no build()'}; call "
                f"m.get_parameter({name!r}).materialize(shape) in build(m, input_shape)")
    m.__dict__["_built"] = True

def undo_build(m, params: dict, modules: dict, declared: dict) -> None:
    for name in [n for n in m._params if m._params[n] is not params.get(n)]:
        m._unregister(name)
    for name in [n for n in m._modules if m._modules[n] is not modules.get(n)]:
        m._unregister(name)
    for name, p in params.items():
        if p.shape != declared[id(p)]:
            p.shape = declared[id(p)]
            context.bump_structure()  # remembered answers (is_built) about this parameter are stale
        if name not in m._params:
            m._register_parameter(name, p)
    for name, child in modules.items():
        if name not in m._modules:
            m._register_module(name, child)

def call_hook(m, cls, shapes):
    hook = cls.__dict__["_build_hook"]
    d = m.__dict__
    d["_building"] = cls
    try:
        hook(m, *shapes[:cls._build_hook_arity])
    finally:
        d["_building"] = None

def run_hook_after(m, running_cls, input_shapes):
    mro = type(m).__mro__
    for c in mro[mro.index(running_cls) + 1:]:
        if c.__dict__.get("_build_hook") is not None:
            call_hook(m, c, list(input_shapes))
            m.__dict__["_building"] = running_cls
            return m
    return m

def draw_parameters(m, only=None) -> None:
    """Give every built parameter of the whole model that has no value yet (or just ``only``) its
    values, each from the random stream of its path in the outermost module."""
    root = root_of(m)
    d = root.__dict__
    if d.get("_model_index") is None:
        d["_model_index"] = init.next_model_index()
    for path, p in index(root).entries:
        if (p is only) if only is not None else (p._value is None and p.is_built):
            p._set_drawn(init.rng_for(path, p._seed, d["_model_index"], p._draws))


def reinitialize(m, how_all=None, inits=None):
    """``Module.reinitialize``: see there."""

    inits = inits or {}
    chosen = []
    names_seen = set()
    for path, p in m.named_parameters():
        local = path.rsplit(".", 1)[-1]
        names_seen.add(local)
        how = inits.get(local, how_all)
        if how is None and (inits or how_all is not None):
            continue
        if how is not None and not callable(how):
            raise TypeError(f"the initializer for '{path}' must be callable init(shape, rng), got {how!r}")
        if not p.is_built:
            raise UninitializedParameterError(p._unbuilt_message("re-initialize"))
        chosen.append((p, how))
    unknown = sorted(set(inits) - names_seen)
    if unknown:
        raise ValueError(f"reinitialize(): {type(m).__name__} has no parameter named {unknown}; "
                         f"its parameter names are {sorted(names_seen)}")
    if not chosen and (how_all is not None or inits or names_seen):
        raise ValueError(f"reinitialize(): nothing to re-initialize in {type(m).__name__}")
    for p, how in chosen:
        p.initialize(how)
    return m
