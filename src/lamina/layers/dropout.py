"""Dropout."""

from __future__ import annotations

from .. import ops
from ..module import Module


class Dropout(Module):
    """In training mode, zero each element with probability ``rate`` (or torch's keyword ``p``) and
    scale the rest by 1 / (1 - rate); in eval mode, return the input unchanged. Shape contract: any shape, unchanged.

    Masks are reproducible from ``lm.manual_seed`` on each backend. Inside the compiled jax train step
    the key comes in as data, a fresh one each step, and each dropout call derives its own from it
    (``lamina.random``), so nothing random is frozen into the compiled program.

    >>> import lamina as lm, numpy as np
    >>> lm.Dropout(0.5).eval()(np.ones(3))
    array([1., 1., 1.])
    """

    def __init__(self, rate: float | None = None, *, p: float | None = None):
        super().__init__()
        if rate is not None and p is not None:
            raise TypeError(f"Dropout takes the rate once, as rate or p (torch's name); got rate={rate!r}, p={p!r}")
        rate = 0.5 if rate is None and p is None else rate if p is None else p
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise TypeError(f"Dropout: rate must be a number in [0, 1), got {rate!r}")
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Dropout: rate must be in [0, 1), got {rate!r}")
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0.0:
            return x
        return ops.dropout(x, self.rate)  # the key comes from lamina.random (see ops.dropout)

    def extra_repr(self):
        return f"rate={self.rate}"
