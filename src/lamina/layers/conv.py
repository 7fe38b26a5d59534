"""Convolution layers, channels first as in the textbook's PyTorch tab: (N, C, L) and (N, C, H, W)."""

from __future__ import annotations

import math

from .. import init as _init
from .. import ops
from ..errors import ShapeError
from ..module import Module
from ..parameter import Parameter
from .checks import floating_input_error


class _ConvNd(Module):
    _n = 0

    def __init__(self, *sizes, in_channels: int | None = None, out_channels: int | None = None, kernel_size=None,
                 stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = True, weight_init=None,
                 bias_init=None, **unknown):
        super().__init__()
        n, name = self._n, type(self).__name__
        if unknown:
            raise TypeError(f"{name}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; its "
                            f"options are in_channels, out_channels, kernel_size, stride, padding, dilation, "
                            f"groups, bias, weight_init, bias_init")
        if out_channels is not None or kernel_size is not None:
            # torch's keywords: positional sizes fill the remaining slots in order, of (in, out, kernel) when three
            # sizes are given in all, of Lamina's short (out, kernel) when two
            named = {"out": out_channels, "kernel": kernel_size}
            total = len(sizes) + sum(v is not None for v in named.values())
            slots = ("in", "out", "kernel") if total == 3 else ("out", "kernel")
            free = [k for k in slots if named.get(k) is None]
            if total not in (2, 3) or free != list(slots[:len(sizes)]):
                raise TypeError(f"{name} takes out_channels and kernel_size once each (positionally or by keyword), "
                                f"with an optional in_channels first; got positional {sizes!r}, "
                                f"out_channels={out_channels!r}, kernel_size={kernel_size!r}")
            named.update(zip(free, sizes))
            sizes = tuple(named[k] for k in slots)
        if len(sizes) == 3:  # torch's order: Conv1d(in_channels, out_channels, kernel_size)
            if in_channels is not None:
                raise TypeError(f"{name}: in_channels given twice (positionally as {sizes[0]!r} and as "
                                f"in_channels={in_channels!r})")
            in_channels, out_channels, kernel_size = sizes
            if not isinstance(in_channels, int) or in_channels <= 0:
                raise ValueError(f"{name}: in_channels must be a positive int, got {in_channels!r}")
        elif len(sizes) == 2:
            out_channels, kernel_size = sizes
        else:
            raise TypeError(f"{name} takes (out_channels, kernel_size) or (in_channels, out_channels, "
                            f"kernel_size) positionally, got {len(sizes)} positional argument(s) {sizes!r}; "
                            f"every other option is keyword-only, e.g. {name}(16, 3, stride=2, padding=1)")
        if not isinstance(out_channels, int) or out_channels <= 0:
            raise ValueError(f"{type(self).__name__}: out_channels must be a positive int, got {out_channels!r}")
        if not isinstance(groups, int) or groups <= 0 or out_channels % groups:
            raise ValueError(f"{type(self).__name__}: groups={groups!r} must be a positive int dividing "
                             f"out_channels={out_channels}")
        self.kernel_size = ops.int_tuple(kernel_size, n, "kernel_size")
        self.stride = ops.int_tuple(stride, n, "stride")
        self.dilation = ops.int_tuple(dilation, n, "dilation")
        self.padding = padding
        self._pads = ops.resolve_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.groups = groups
        self.out_channels = out_channels
        if in_channels is not None and in_channels % groups:
            raise ValueError(f"{type(self).__name__}: in_channels={in_channels} is not divisible by groups={groups}")
        cin = None if in_channels is None else in_channels // groups
        self.weight = Parameter((out_channels, cin, *self.kernel_size),
                                init=weight_init or _init.kaiming_uniform(math.sqrt(5), nonlinearity="leaky_relu"))
        self.bias = Parameter((out_channels,), init=bias_init or _init.zeros()) if bias else None

    @property
    def in_channels(self) -> int | None:
        cin = self.get_parameter("weight").shape[1]
        return None if cin is None else cin * self.groups

    def build(self, input_shape):
        if len(input_shape) != self._n + 2:
            axes = ", ".join("L" if self._n == 1 else "HW"[-self._n:] if self._n == 2 else "DHW")
            raise ShapeError(self, f"expects inputs of shape (N, C, {axes}), got {tuple(input_shape)}")
        c = input_shape[1]
        if self.in_channels is None:
            if c % self.groups:
                raise ShapeError(self, f"got {c} input channels, not divisible by groups={self.groups}")
            self.get_parameter("weight").materialize((self.out_channels, c // self.groups, *self.kernel_size))
        elif c != self.in_channels:
            raise self._channels_error(input_shape)

    def forward(self, x):
        return ops.conv(x, self.weight, self.bias, self.stride, self._pads, self.dilation, self.groups)

    def diagnose(self, args):
        shape = tuple(getattr(args[0], "shape", ())) if args else ()
        if len(shape) != self._n + 2 or shape[1] != self.in_channels:
            return self._channels_error(shape)
        return floating_input_error(self, args) or super().diagnose(args)

    def _channels_error(self, shape):
        return ShapeError(self, f"expected input (N, {self.in_channels}, ...) with {self._n} spatial axes, "
                          f"got shape {tuple(shape)}")

    def extra_repr(self):
        cin = "?" if self.in_channels is None else self.in_channels
        extra = "".join(f", {k}={v}" for k, v in (("stride", self.stride), ("padding", self.padding),
                                                  ("dilation", self.dilation), ("groups", self.groups))
                         if v not in ((1,) * self._n, 0, 1))
        return f"{cin} -> {self.out_channels}, kernel_size={self.kernel_size}{extra}"


class Conv1d(_ConvNd):
    """1-d convolution: (N, C_in, L) -> (N, C_out, L_out), torch's semantics (cross-correlation).

    ``Conv1d(out_channels, kernel_size, *, in_channels=None, stride=1, padding=0, dilation=1, groups=1,
    bias=True)`` or, in torch's order, ``Conv1d(in_channels, out_channels, kernel_size, *, ...)`` (like
    ``Linear(out)`` / ``Linear(in, out)``); every option after the sizes is keyword-only. torch's keywords
    work too: ``Conv1d(in_channels=3, out_channels=4, kernel_size=3)``, ``Conv1d(3, 4, kernel_size=3)``. ``padding`` is
    an int, "valid" or "same" (stride 1). ``in_channels`` is inferred from the first input when not given.
    L_out = floor((L + pad_low + pad_high - dilation * (k - 1) - 1) /
    stride) + 1. Weight (C_out, C_in // groups, k), default U[-1/sqrt(fan_in), 1/sqrt(fan_in)] with
    fan_in = C_in // groups * k (torch's); bias zeros.

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); lm.Conv1d(4, 3, padding="same")(np.zeros((2, 5, 10), "float32")).shape
    <lamina backend 'numpy'>
    (2, 4, 10)
    """

    _n = 1


class Conv2d(_ConvNd):
    """2-d convolution: (N, C_in, H, W) -> (N, C_out, H_out, W_out), torch's semantics; arguments and
    defaults as ``Conv1d`` with pairs (an int means the same for both axes).

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); lm.Conv2d(8, 3, stride=2, padding=1)(np.zeros((1, 3, 28, 28), "float32")).shape
    <lamina backend 'numpy'>
    (1, 8, 14, 14)
    """

    _n = 2
