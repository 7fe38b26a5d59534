"""Pooling layers, channels first."""

from __future__ import annotations

from .. import ops
from ..errors import ShapeError
from ..module import Module
from .checks import floating_input_error


class _PoolNd(Module):
    _n, _kind = 0, ""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = ops.int_tuple(kernel_size, self._n, "kernel_size")
        self.stride = self.kernel_size if stride is None else ops.int_tuple(stride, self._n, "stride")
        pads = ops.resolve_padding(padding, self.kernel_size, self.stride, (1,) * self._n)
        if any(lo > k // 2 for (lo, _), k in zip(pads, self.kernel_size)):
            raise ValueError(f"{type(self).__name__}: padding {padding!r} must be at most half the kernel size "
                             f"{self.kernel_size}")
        self.padding, self._pads = padding, pads

    def forward(self, x):
        return ops.pool(x, self._kind, self.kernel_size, self.stride, self._pads)

    def diagnose(self, args):
        shape = tuple(getattr(args[0], "shape", ())) if args else ()
        if len(shape) != self._n + 2:
            return ShapeError(self, f"expects inputs with {self._n} spatial axes after (N, C), got shape {shape}")
        return floating_input_error(self, args) or super().diagnose(args)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}" + (f", padding={self.padding}"
                                                                          if self.padding else "")


class MaxPool1d(_PoolNd):
    """Max over windows: (N, C, L) -> (N, C, L_out); ``stride`` defaults to ``kernel_size``; padding (at
    most half the kernel) counts as -inf. No parameters."""

    _n, _kind = 1, "max"


class MaxPool2d(_PoolNd):
    """Max over 2-d windows: (N, C, H, W) -> (N, C, H_out, W_out), as ``MaxPool1d`` per axis.

    >>> import lamina as lm, numpy as np
    >>> lm.MaxPool2d(2)(np.arange(16.0).reshape(1, 1, 4, 4))
    array([[[[ 5.,  7.],
             [13., 15.]]]])
    """

    _n, _kind = 2, "max"


class AvgPool1d(_PoolNd):
    """Mean over windows: (N, C, L) -> (N, C, L_out); padding counts as zeros (torch's default)."""

    _n, _kind = 1, "avg"


class AvgPool2d(_PoolNd):
    """Mean over 2-d windows: (N, C, H, W) -> (N, C, H_out, W_out), as ``AvgPool1d`` per axis."""

    _n, _kind = 2, "avg"


class GlobalAvgPool(Module):
    """Mean over every spatial axis: (N, C, *spatial) -> (N, C).

    >>> import lamina as lm, numpy as np
    >>> lm.GlobalAvgPool()(np.ones((2, 3, 4, 4))).shape
    (2, 3)
    """

    def forward(self, x):
        return ops.namespace(x).mean(x, axis=tuple(range(2, x.ndim)))
