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

from .backends import backend_of
from .errors import CheckpointError

__all__ = ["plan_load", "apply_load"]

_FLOATS = {"float16", "bfloat16", "float32", "float64"}


# ----- the load plan: check everything, then write ------------------------------------------------
def plan_load(model, specs: dict, aliases: dict, allow_missing: bool, ignore_extra: bool, source: str,
              same=None):
    """Match ``specs`` ({key: (shape, dtype name)}) and ``aliases`` ({alias path: stored key}) to the model;
    raise one error listing every problem. Returns ``(assignments, retie)``: ``[(parameter, key)]`` to
    write and ``[(path, parameter)]`` to tie.

    Ties are matched as a whole: a parameter that the model shares between several paths must come from
    one stored tensor (an untied checkpoint would otherwise lose one of its copies), and a tie recorded in
    the file may only join parameters of the same kind (parameter or buffer), dtype, trainability and
    shape. ``same(key_a, key_b)``, where given, says whether two stored tensors are equal: then a shared
    parameter may come from several keys that hold the same values (an in-memory mapping such as torch's
    ``state_dict()``, which lists a tied weight under every path)."""
    bad = [k for k in list(specs) + list(aliases) + list(aliases.values()) if not isinstance(k, str)]
    if bad:
        raise TypeError(f"cannot load {source} into {type(model).__name__}: keys must be strings (dotted "
                        f"parameter paths such as '0.weight'), got {bad[:5]!r}")
    idx = model._index()
    paths = idx.paths
    missing, extra, mismatched, assignments, retie = [], [], [], [], []
    for alias, target in aliases.items():
        if alias in specs or target not in specs:
            mismatched.append(f"{alias}: tied to {target!r}, but "
                              + ("a tensor is also stored under the alias itself" if alias in specs
                                 else "no tensor is stored under that name"))
    aliases = {a: t for a, t in aliases.items() if a not in specs and t in specs}

    def source_of(path):
        return path if path in specs else aliases.get(path)

    groups: dict[int, list] = {}  # every path of each model parameter
    for path, p in paths.items():
        groups.setdefault(id(p), []).append(path)
    used: set[str] = set()
    targets: dict[str, object] = {}  # stored key -> the model parameter that receives it
    for path, p in idx.entries:
        sources = {source_of(q) for q in groups[id(p)]} - {None}
        if len(sources) > 1 and same is not None:
            first, *rest = sorted(sources)
            if all(specs[first] == specs[k] and same(first, k) for k in rest):
                used |= sources
                sources = {first}
        if len(sources) > 1:
            shared = ", ".join(groups[id(p)])
            mismatched.append(f"{shared}: one shared parameter in the model, but the checkpoint holds separate "
                              f"tensors {sorted(sources)} for them (loading would drop all but one; build the "
                              "model without the sharing, or save it from a model that shares it)")
            used |= sources
            continue
        if not sources:
            if getattr(p, "persistent", True):
                missing.append(path)
            continue
        key = sources.pop()
        used.add(key)
        targets.setdefault(key, []).append((path, p))
    for key, owners in targets.items():
        # the parameter at the stored key's own path receives the value; the others are tied to it
        owners.sort(key=lambda e: e[0] != key and key not in groups[id(e[1])])
        path, p = owners[0]
        problem = _check(p, *specs[key])
        if problem:
            mismatched.append(f"{key}: {problem}" if key in groups[id(p)] else f"{path} (stored as {key}): {problem}")
            continue
        assignments.append((p, key))
        for other_path, q in owners[1:]:
            problem = _tie_problem(q, p, specs[key])
            if problem:
                mismatched.append(f"{other_path}: the checkpoint ties it to {key}, but {problem}")
                continue
            retie.extend((a, p) for a in groups[id(q)])
    for key in specs:
        if key not in used:
            extra.append(key)
    for alias, target in aliases.items():
        if alias not in paths:
            extra.append(f"{alias} (alias of {target})")
    order = {k: i for i, k in enumerate(specs)}
    assignments.sort(key=lambda e: order[e[1]])
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


def _tie_problem(q, p, spec) -> str | None:
    """Why parameter ``q`` may not be replaced by ``p`` (a tie recorded in a file), or None."""
    def kind(x):
        return "buffer" if x.is_buffer else "parameter"

    if kind(q) != kind(p):
        return f"it is a {kind(q)} in the model and {kind(p)} would replace it"
    if q.dtype != p.dtype:
        return f"it has dtype {q.dtype} in the model and the tied one {p.dtype}"
    if bool(getattr(q, "trainable", False)) != bool(getattr(p, "trainable", False)):
        return "one of them is trainable and the other is not"
    if getattr(q, "persistent", True) != getattr(p, "persistent", True):
        return "one of them is persistent and the other is not"
    return _check(q, *spec)


def _check(p, shape, dtype) -> str | None:
    if p.is_built and tuple(shape) != p.shape:
        hint = ""
        if len(shape) == 2 and tuple(shape) == p.shape[::-1]:
            hint = (" (transposed: PyTorch stores a Linear weight as (out, in), Lamina as (in, out); load torch "
                    "weights with lm.load_torch(model, torch_module_or_state_dict))")
        return f"shape {tuple(shape)} in the checkpoint, {p.shape} in the model{hint}"
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


def apply_load(model, plan, fetch, reader=None, source: str = "the state dict") -> None:
    """Write the planned values. With a ``reader`` (a checkpoint file), a tensor whose parameter already
    has a value of the same shape and dtype in host memory is read from the file straight into that
    memory: no second copy and no memory map, so a load needs almost nothing beyond the model itself.
    Other tensors are read as new arrays, which become the parameter's memory without another copy.
    A value written in place is reported to the backend (torch bumps the tensor's version counter), so
    a backward pass through a graph recorded before the load raises, as after ``load_state_dict``."""
    assignments, retie = plan
    early = {}  # values a backend may refuse (jax without x64: int64 beyond int32): converted before any write
    for p, key in assignments:
        dtype = reader.specs[key][1] if reader is not None else getattr(fetch(key), "dtype", None)
        if dtype is not None and p.backend.checks_values(str(dtype).removeprefix("torch.")):
            try:
                value = reader.get(key) if reader is not None else fetch(key)
                owner = backend_of(value)
                early[key] = p.backend.from_numpy(np.asarray(value if owner is None else owner.to_numpy(value)),
                                                  p._device)
            except ValueError as e:
                raise CheckpointError(f"cannot load {source} into {type(model).__name__}: '{key}': {e}. Nothing "
                                      "was changed.") from e
    for alias, target in retie:  # tie first, so a retied parameter gets its value once
        owner_path, _, name = alias.rpartition(".")
        owner = model
        for part in owner_path.split(".") if owner_path else ():
            owner = owner._modules[part]  # (walks shared modules too: the index lists each module once)
        setattr(owner, name, target)
    for p, key in assignments:
        if key in early:
            p.assign(early[key], copy=False)
            continue
        if reader is not None:
            # only a drawn value is read into (p.device is None before the draw): an undrawn parameter is
            # not drawn just to be overwritten
            value = p.value if p.device is not None else None
            view = p.backend.host_view(value) if value is not None else None
            if (view is not None and view.shape == reader.specs[key][0] and p.dtype == reader.specs[key][1]
                    and reader.read_into(key, view)):
                p.written_in_place()
                continue
            p.assign(p.backend.from_numpy(reader.get(key), p._device, copy=False), copy=False)
        else:
            p.assign(fetch(key))
    model._draw_parameters()  # anything left without a value (allow_missing on a fresh model)
