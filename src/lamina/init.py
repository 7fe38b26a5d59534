"""Initializers and seeding.

An initializer is any callable ``init(shape, rng) -> array`` where ``shape`` is a tuple of ints and ``rng``
a ``numpy.random.Generator``; it returns the values as a NumPy array (or anything ``numpy.asarray``
accepts), which Lamina casts to the parameter's dtype and moves to its backend and device. Because every
value is drawn with NumPy, one seed gives bit-identical initial weights on every backend.

Each parameter draws from its own random stream, derived from three things: the seed in force when the
parameter was created (``lm.manual_seed``), the order in which whole models were first initialized
since then, and the parameter's dotted path in its model. So the values do not depend on the order in
which the layers inside a model are built, two models built one after the other still differ, and the
same script gives the same weights on every run and backend.

The fan rules used by the Xavier and Kaiming initializers (``fans(shape)``): a 2-D weight is
``(in, out)`` as in ``X @ W``; a weight with 3 or more axes is ``(out, in, *kernel)`` as in a
convolution; a 1-D parameter has fan-in and fan-out equal to its length.

>>> import lamina as lm
>>> w = lm.init.xavier_uniform()((4, 3), lm.init.rng_for("w"))
>>> w.shape
(4, 3)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import numpy as np

from . import context

__all__ = [
    "Initializer", "zeros", "ones", "constant", "normal", "uniform", "xavier_uniform", "xavier_normal",
    "kaiming_uniform", "kaiming_normal", "fans", "manual_seed", "rng_for",
    "zeros_", "ones_", "constant_", "normal_", "uniform_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
    "kaiming_normal_",
]

InitFn = Callable[[tuple, np.random.Generator], "np.ndarray"]


def manual_seed(seed: int) -> None:
    """Make initial values reproducible (same seed, same weights, on every backend) and random layers
    such as dropout too (same seed, same masks on a given backend).

    Applies to parameters created after the call.
    """
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    context.set_seed(int(seed))  # dropout masks too


current_seed = context.seed
next_model_index = context.next_model_index


def rng_for(path: str, seed: int | None = None, model_index: int = 0, draw: int = 0) -> np.random.Generator:
    """The random stream of the parameter at ``path`` (``draw`` counts re-initializations)."""
    digest = hashlib.blake2b(path.encode(), digest_size=16).digest()
    words = np.frombuffer(digest, dtype=np.uint32).tolist()
    s = context.seed() if seed is None else seed
    return np.random.default_rng(np.random.SeedSequence([s & 0xFFFFFFFF, s >> 32, model_index, draw, *words]))


def fans(shape: tuple) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of this shape (see the module docstring for the layout rules)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


class Initializer:
    """A named initializer: ``init(shape, rng)`` returns a NumPy array of that shape."""

    def __init__(self, fn: InitFn, description: str):
        self._fn = fn
        self._description = description

    def __call__(self, shape: tuple, rng: np.random.Generator) -> np.ndarray:
        return self._fn(tuple(shape), rng)

    def __repr__(self) -> str:
        return self._description


def zeros() -> Initializer:
    """All zeros."""
    return Initializer(lambda shape, rng: np.zeros(shape), "zeros()")


def ones() -> Initializer:
    """All ones."""
    return Initializer(lambda shape, rng: np.ones(shape), "ones()")


def constant(value: float) -> Initializer:
    """Every element equal to ``value``."""
    return Initializer(lambda shape, rng: np.full(shape, value), f"constant({value!r})")


def normal(mean: float = 0.0, std: float = 1.0) -> Initializer:
    """Independent draws from N(mean, std**2)."""
    if std < 0:
        raise ValueError(f"normal(): std must be >= 0, got {std}")
    return Initializer(lambda shape, rng: rng.normal(mean, std, shape), f"normal(mean={mean}, std={std})")


def uniform(low: float = 0.0, high: float = 1.0) -> Initializer:
    """Independent draws from U[low, high)."""
    if high < low:
        raise ValueError(f"uniform(): high must be >= low, got low={low}, high={high}")
    return Initializer(lambda shape, rng: rng.uniform(low, high, shape), f"uniform(low={low}, high={high})")


def xavier_uniform(gain: float = 1.0) -> Initializer:
    """Glorot uniform: U[-a, a] with a = gain * sqrt(6 / (fan_in + fan_out))."""

    def fn(shape, rng):
        fan_in, fan_out = fans(shape)
        a = gain * math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-a, a, shape)

    return Initializer(fn, f"xavier_uniform(gain={gain})")


def xavier_normal(gain: float = 1.0) -> Initializer:
    """Glorot normal: N(0, std**2) with std = gain * sqrt(2 / (fan_in + fan_out))."""

    def fn(shape, rng):
        fan_in, fan_out = fans(shape)
        return rng.normal(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), shape)

    return Initializer(fn, f"xavier_normal(gain={gain})")


def _kaiming_std(shape, a, mode, nonlinearity):
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"kaiming: mode must be 'fan_in' or 'fan_out', got {mode!r}")
    gains = {"relu": math.sqrt(2.0), "leaky_relu": math.sqrt(2.0 / (1 + a * a)), "linear": 1.0,
             "tanh": 5.0 / 3, "sigmoid": 1.0}
    if nonlinearity not in gains:
        raise ValueError(f"kaiming: nonlinearity must be one of {sorted(gains)}, got {nonlinearity!r}")
    fan_in, fan_out = fans(shape)
    return gains[nonlinearity] / math.sqrt(fan_in if mode == "fan_in" else fan_out)


def kaiming_uniform(a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "relu") -> Initializer:
    """He uniform: U[-b, b] with b = sqrt(3) * gain / sqrt(fan), as ``torch.nn.init.kaiming_uniform_``.

    ``kaiming_uniform(a=math.sqrt(5), nonlinearity="leaky_relu")`` is U[-1/sqrt(fan_in), 1/sqrt(fan_in)],
    the default of ``lm.Linear`` (and of ``torch.nn.Linear``'s weight).
    """
    _kaiming_std((1, 1), a, mode, nonlinearity)  # validate now, not at first use

    def fn(shape, rng):
        b = math.sqrt(3.0) * _kaiming_std(shape, a, mode, nonlinearity)
        return rng.uniform(-b, b, shape)

    return Initializer(fn, f"kaiming_uniform(a={a}, mode={mode!r}, nonlinearity={nonlinearity!r})")


def kaiming_normal(a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "relu") -> Initializer:
    """He normal: N(0, std**2) with std = gain / sqrt(fan), as ``torch.nn.init.kaiming_normal_``."""
    _kaiming_std((1, 1), a, mode, nonlinearity)

    def fn(shape, rng):
        return rng.normal(0.0, _kaiming_std(shape, a, mode, nonlinearity), shape)

    return Initializer(fn, f"kaiming_normal(a={a}, mode={mode!r}, nonlinearity={nonlinearity!r})")


# ----- in place, as torch.nn.init: applied to a parameter (or the array a module shows for it) -------------
def _fill(target, init: Initializer):
    """Draw new values for ``target`` with ``init`` and return it. ``target`` is an ``lm.Parameter`` or the
    array a module shows for one (``module.weight`` inside ``model.apply(fn)``); its own initializer, used by
    ``reinitialize()``, is kept."""
    p = target if hasattr(target, "initialize") else context.parameter_of(target)
    if p is None:
        raise TypeError(f"{init!r}: expected an lm.Parameter or a parameter's array (module.weight), got "
                        f"{type(target).__name__}; a plain array is not a parameter (wrap it: lm.Parameter(x))")
    own = p.init
    try:
        p.initialize(init)
    finally:
        p.init = own
    return target if hasattr(target, "initialize") else p.value


def zeros_(param):
    """Fill with zeros, in place (``torch.nn.init.zeros_``). Returns the new value."""
    return _fill(param, zeros())


def ones_(param):
    """Fill with ones, in place."""
    return _fill(param, ones())


def constant_(param, value: float):
    """Fill with ``value``, in place."""
    return _fill(param, constant(value))


def normal_(param, mean: float = 0.0, std: float = 1.0):
    """Draw from N(mean, std**2), in place (``torch.nn.init.normal_``)."""
    return _fill(param, normal(mean, std))


def uniform_(param, a: float = 0.0, b: float = 1.0):
    """Draw from U[a, b), in place (``torch.nn.init.uniform_``)."""
    return _fill(param, uniform(a, b))


def xavier_uniform_(param, gain: float = 1.0):
    """Glorot uniform, in place (fans by Lamina's layout rules: see ``fans``)."""
    return _fill(param, xavier_uniform(gain))


def xavier_normal_(param, gain: float = 1.0):
    """Glorot normal, in place."""
    return _fill(param, xavier_normal(gain))


def kaiming_uniform_(param, a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "relu"):
    """He uniform, in place."""
    return _fill(param, kaiming_uniform(a, mode, nonlinearity))


def kaiming_normal_(param, a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "relu"):
    """He normal, in place."""
    return _fill(param, kaiming_normal(a, mode, nonlinearity))
