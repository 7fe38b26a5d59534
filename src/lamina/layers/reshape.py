"""Layers that only move data around: ``Flatten`` and ``Identity``."""

from __future__ import annotations

from ..errors import ShapeError
from ..module import Module


class Flatten(Module):
    """Flatten every axis after the first (the batch): (N, d1, d2, ...) -> (N, d1 * d2 * ...).

    >>> import lamina as lm, numpy as np
    >>> lm.Flatten()(np.zeros((2, 3, 4))).shape
    (2, 12)
    """

    def forward(self, x):
        return x.reshape(x.shape[0], -1)

    def diagnose(self, args):
        if args and getattr(args[0], "ndim", 1) == 0:
            return ShapeError(self, "expects an input with a batch axis, got a scalar")
        return super().diagnose(args)


class Identity(Module):
    """Returns its input unchanged (a placeholder, e.g. for a skipped block)."""

    def forward(self, x):
        return x
