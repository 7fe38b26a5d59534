"""The state-dict load plan: match a ``{key: (shape, dtype)}`` description against a model, report every
problem at once, then write. Shared by ``Module.load_state_dict`` and ``lm.load_into``.

All or nothing: ``plan_load`` checks every key, shape and dtype and raises one ``CheckpointError`` listing
every missing key, unexpected key and mismatch before anything is written; ``apply_load`` then writes.

Dtype policy: a floating-point value loads into a floating-point parameter of another precision by
casting; an integer loads into an integer type that holds all its values (int32 into int64); any other
difference is a mismatch.
"""

from __future__ import annotations

import numpy as np

from .errors import CheckpointError

__all__ = ["plan_load", "apply_load"]

_FLOATS = {"float16", "bfloat16", "float32", "float64"}


# ----- the load plan: check everything, then write ------------------------------------------------
def plan_load(model, specs: dict, aliases: dict, allow_missing: bool, ignore_extra: bool, source: str):
    """Match ``specs`` ({key: (shape, dtype name)}) to the model; raise one error listing every problem."""
    idx = model._index()
    paths = idx.paths
    missing, extra, mismatched, assignments, retie = [], [], [], [], []
    matched: set[int] = set()
    for key, (shape, dtype) in specs.items():
        p = paths.get(key)
        if p is None:
            extra.append(key)
            continue
        problem = _check(p, shape, dtype)
        if problem:
            mismatched.append(f"{key}: {problem}")
            matched.add(id(p))  # present, just wrong: not also "missing"
            continue
        if any(q is p for q, _ in assignments):
            continue  # the same parameter under a second path: one write is enough
        matched.add(id(p))
        assignments.append((p, key))
    for alias, target in aliases.items():
        a, t = paths.get(alias), paths.get(target)
        if a is None:
            extra.append(f"{alias} (alias of {target})")
        elif t is not None and a is not t:
            if a.shape != t.shape and a.is_built:
                mismatched.append(f"{alias}: is tied to {target} in the file but has shape {a.shape} here")
            else:
                retie.append((alias, t))
                matched.add(id(a))
    for path, p in idx.entries:
        if id(p) not in matched and getattr(p, "persistent", True):
            missing.append(path)
    problems = []
    if missing and not allow_missing:
        problems.append(f"missing keys (in the model, not in the checkpoint): {missing}")
    if extra and not ignore_extra:
        lazy = _lazy_owners(model, extra)
        problems.append(f"unexpected keys (in the checkpoint, not in the model): {extra}" + lazy)
    if mismatched:
        problems.append("mismatched: " + "; ".join(mismatched))
    if problems:
        fixes = []
        if missing and not allow_missing:
            fixes.append("allow_missing=True keeps the model's values for missing keys")
        if extra and not ignore_extra:
            fixes.append("ignore_extra=True skips unexpected keys")
        raise CheckpointError(f"cannot load {source} into {type(model).__name__}; nothing was changed.\n  "
                              + "\n  ".join(problems) + ("\n  (" + "; ".join(fixes) + ")" if fixes else ""))
    return assignments, retie


def _check(p, shape, dtype) -> str | None:
    if p.is_built and tuple(shape) != p.shape:
        return f"shape {tuple(shape)} in the checkpoint, {p.shape} in the model"
    if not p.is_built and (len(shape) != len(p.shape)
                           or any(a is not None and a != b for a, b in zip(p.shape, shape))):
        return f"shape {tuple(shape)} in the checkpoint does not fit {p.shape} declared in the model"
    if dtype != p.dtype and not _castable(dtype, p):
        return (f"dtype {dtype} in the checkpoint, {p.dtype} in the model (floating types are cast, integers "
                "only widened)")
    return None


def _castable(dtype: str, p) -> bool:
    """The dtype policy: floating into floating; an integer into an integer type that holds all its values;
    and whatever the backend itself stores the declared type as (jax without x64: int64 as int32)."""
    if dtype in _FLOATS and p.dtype in _FLOATS:
        return True
    if dtype == p.backend.canonical_dtype(p.dtype):
        return True
    try:
        src, dst = np.dtype(dtype), np.dtype(p.dtype)
    except TypeError:
        return False
    return src.kind in "iu" and dst.kind in "iu" and np.can_cast(src, dst, casting="safe")


def _lazy_owners(model, keys) -> str:
    """A hint when unexpected keys belong to layers that create their parameters in build()."""
    modules = dict(model._index().modules)
    unbuilt = sorted({k.rpartition(".")[0] for k in keys
                      if (m := modules.get(k.rpartition(".")[0])) is not None and not m._built
                      and m._build_hook is not None})
    if not unbuilt:
        return ""
    return (f"; layers {unbuilt} create their parameters in build(), so build the model first "
            "(model.build(input_shape) or one call) and load again")


def apply_load(model, plan, fetch, reader=None) -> None:
    """Write the planned values. With a ``reader`` (a checkpoint file), a tensor whose parameter already
    has a value of the same shape and dtype in host memory is read from the file straight into that
    memory: no second copy and no memory map, so a load needs almost nothing beyond the model itself.
    Other tensors are read as new arrays, which become the parameter's memory without another copy."""
    assignments, retie = plan
    idx = model._index()
    for alias, target in retie:  # tie first, so a retied parameter gets its value once
        owner_path, _, name = alias.rpartition(".")
        owner = dict(idx.modules)[owner_path]
        setattr(owner, name, target)
    for p, key in assignments:
        if reader is not None:
            view = p.backend.host_view(p._value) if p._value is not None else None
            if (view is not None and view.shape == reader.specs[key][0] and p.dtype == reader.specs[key][1]
                    and reader.read_into(key, view)):
                p._grad = None
                continue
            p._assign(p.backend.from_numpy(reader.get(key), p._device, copy=False), fresh=True)
        else:
            p._assign(fetch(key))
    model._draw_parameters()  # anything left without a value (allow_missing on a fresh model)
