"""Activation layers: thin layers over ``lm.ops``. Shape contract: any shape in, the same shape out."""

from __future__ import annotations

from .. import ops
from ..module import Module


class ReLU(Module):
    """max(x, 0) elementwise."""

    def forward(self, x):
        return ops.relu(x)


class LeakyReLU(Module):
    """x if x > 0 else negative_slope * x."""

    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        return ops.leaky_relu(x, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


class Sigmoid(Module):
    """1 / (1 + exp(-x))."""

    def forward(self, x):
        return ops.sigmoid(x)


class Tanh(Module):
    """tanh(x)."""

    def forward(self, x):
        return ops.tanh(x)


class GELU(Module):
    """x * Phi(x); ``approximate=True`` uses the tanh approximation."""

    def __init__(self, approximate: bool = False):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return ops.gelu(x, self.approximate)

    def extra_repr(self):
        return "approximate=True" if self.approximate else ""


class Softmax(Module):
    """Softmax along ``axis`` (default: the last)."""

    def __init__(self, axis: int = -1):
        super().__init__()
        self.axis = axis

    def forward(self, x):
        return ops.softmax(x, self.axis)

    def extra_repr(self):
        return f"axis={self.axis}"


class LogSoftmax(Softmax):
    """Log of the softmax along ``axis``, computed stably."""

    def forward(self, x):
        return ops.log_softmax(x, self.axis)
