"""Input checks shared by the built-in layers' ``diagnose`` (run only after a failure, so a call pays nothing).

A layer's kernel may refuse an integer or boolean input with the backend's own error (torch's
RuntimeError, TensorFlow's InvalidArgumentError); ``diagnose`` replaces it with one clear TypeError.
"""

from __future__ import annotations

from .. import ops


def floating_input_error(layer, args) -> TypeError | None:
    """A TypeError naming ``layer`` when its first input is not real floating-point, else None."""
    x = args[0] if args else None
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return None
    try:
        floating = ops.namespace(x).isdtype(dtype, "real floating")
    except Exception:  # not an array of a known backend: nothing to say about its dtype
        return None
    if floating:
        return None
    name = str(dtype).removeprefix("torch.")
    return TypeError(f"{type(layer).__name__} expects real floating-point input, got dtype {name}"
                     f" (shape {tuple(x.shape)}); cast it first, e.g. lm.ops.astype(x, 'float32')")
