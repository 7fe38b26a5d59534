"""``Module.summary``: a table of the layers with their output shapes and parameter counts."""

from __future__ import annotations

import numpy as np

from . import tree

__all__ = ["summary"]


def summary(model, input_shapes: tuple, print_fn=print) -> str:
    """The table that ``model.summary(*input_shapes)`` prints (see there)."""
    shapes = [tuple(s) for s in input_shapes]
    if not shapes:
        raise TypeError("summary() needs the input shape, e.g. model.summary((None, 20))")
    model.build(*shapes)
    idx = tree.index(model)
    outputs: dict[int, str] = {}

    def recorder(m):
        forward = m.forward

        def record(*args, **kwargs):
            out = forward(*args, **kwargs)
            outs = out if isinstance(out, tuple | list) else (out,)
            outputs[id(m)] = ", ".join(str(tuple(o.shape)) if hasattr(o, "shape") else type(o).__name__
                                       for o in outs)
            return out

        return record

    for _, m in idx.modules:
        m.__dict__["forward"] = recorder(m)
    try:
        model.dry_run(*[np.zeros([1 if s is None else s for s in shape], np.float32) for shape in shapes])
    finally:
        for _, m in idx.modules:
            m.__dict__.pop("forward", None)
    counted: set[int] = set()
    first_path: dict[int, str] = {}
    rows = [("Layer (path)", "Type", "Output shape", "Params")]

    def walk(m, path):  # every use of every module, shared ones included
        yield path, m
        for name, child in m._modules.items():
            yield from walk(child, f"{path}.{name}" if path else name)

    for path, m in walk(model, ""):
        n = 0
        for p in m._params.values():
            if id(p) not in counted and not p.is_buffer:
                counted.add(id(p))
                n += p.size
        kind = type(m).__name__
        if id(m) in first_path:
            kind += f" (shared with {first_path[id(m)]})"
        first_path.setdefault(id(m), path)
        depth = path.count(".") + 1 if path else 0
        rows.append(("  " * depth + (path or "(model)"), kind, outputs.get(id(m), "-"), f"{n:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    line = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    params = [p for _, p in idx.entries if not p.is_buffer]
    total = sum(p.size for p in params)
    trainable = sum(p.size for p in params if p.trainable)
    nbytes = sum(p.nbytes for p in params)
    buffers = sum(p.nbytes for _, p in idx.entries if p.is_buffer)
    rule = "-" * len(line(rows[0]))
    text = "\n".join([line(rows[0]), rule, *map(line, rows[1:]), rule,
                      f"Total parameters: {total:,} ({fmt_bytes(nbytes)}), trainable: {trainable:,}",
                      f"Buffers: {fmt_bytes(buffers)}"])
    if print_fn is not None:
        print_fn(text)
    return text


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
