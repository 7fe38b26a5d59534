"""The textbook's first exercise: a layer computing y_k = sum_ij W_ijk x_i x_j."""

from __future__ import annotations

from .. import init as _init
from ..errors import ShapeError
from ..module import Module
from ..parameter import Parameter
from .checks import floating_input_error

# N(0, (1/in)^2), with ``in`` read from the shape when the values are drawn
_DEFAULT_INIT = _init.Initializer(lambda shape, rng: rng.normal(0.0, 1.0 / shape[0], shape), "normal(0, 1/in)")


class TensorReduction(Module):
    """A quadratic form per output unit: ``y[..., k] = sum_ij W[i, j, k] * x[..., i] * x[..., j]``.

    ``W`` has shape (in, in, units); ``in`` is inferred from the first input unless given.
    Shape contract: (..., in) -> (..., units). Default initializer of ``W``: N(0, (1/in)**2), so that
    outputs stay of the order of the inputs' squared size.

    It is computed as one matmul, ``t = x @ W.reshape(in, in * units)``, then a sum over ``j`` of
    ``t[..., j, k] * x[..., j]``: O(in^2 * units) per example, no (in, in) outer product stored.

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); layer = lm.TensorReduction(2)
    <lamina backend 'numpy'>
    >>> layer(np.ones((4, 3), "float32")).shape
    (4, 2)
    """

    def __init__(self, units: int, in_features: int | None = None, *, init=None):
        super().__init__()
        if not isinstance(units, int) or units <= 0:
            raise ValueError(f"TensorReduction: units must be a positive int, got {units!r}")
        self.units = units
        self.weight = Parameter((in_features, in_features, units), init=init or _DEFAULT_INIT)

    @property
    def in_features(self) -> int | None:
        """The input size: given, inferred from the first input, or from a loaded checkpoint."""
        return self.get_parameter("weight").shape[0]

    def build(self, input_shape):
        n = input_shape[-1] if input_shape else None
        if self.in_features is None:
            self.get_parameter("weight").materialize((n, n, self.units))
        elif n != self.in_features:
            raise self._shape_error(input_shape)

    def forward(self, x):
        n, k = self.in_features, self.units
        t = (x @ self.weight.reshape(n, n * k)).reshape(*x.shape[:-1], n, k)
        return (t * x[..., None]).sum(-2)

    def diagnose(self, args):
        shape = tuple(getattr(args[0], "shape", ())) if args else ()
        if not shape or shape[-1] != self.in_features:
            return self._shape_error(shape)
        return floating_input_error(self, args) or super().diagnose(args)

    def _shape_error(self, shape):
        return ShapeError(self, f"expected input with last axis {self.in_features}, got shape {tuple(shape)}")

    def extra_repr(self):
        return f"{'?' if self.in_features is None else self.in_features} -> {self.units}"
