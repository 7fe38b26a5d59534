"""The fully connected layer."""

from __future__ import annotations

import math

import numpy as np

from .. import init as _init
from .. import ops
from ..errors import ShapeError
from ..module import Module
from ..parameter import Parameter
from .checks import floating_input_error


class Linear(Module):
    """``y = x @ weight + bias``: a dense layer, with ``weight`` of shape (in, out) and ``bias`` (out,).

    ``Linear(out)`` infers ``in`` from the last axis of its first input; ``Linear(in, out)`` knows it
    at once (like ``range(stop)`` / ``range(start, stop)``). The weight is (in, out), the textbook's
    ``MyLinear`` layout and Keras/Flax's; ``torch.nn.Linear`` stores the transpose (out, in): bring torch
    weights in with ``lm.load_torch``, which transposes them.

    Shape contract: (..., in) -> (..., out).

    Default initializers: ``weight`` U[-1/sqrt(in), 1/sqrt(in)] (``init.kaiming_uniform(a=sqrt(5),
    nonlinearity="leaky_relu")``, torch.nn.Linear's choice), ``bias`` zeros. Change them with
    ``weight_init=`` / ``bias_init=``, or later with ``reinitialize``.

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); layer = lm.Linear(3)
    <lamina backend 'numpy'>
    >>> layer(np.ones((2, 5), "float32")).shape, layer.get_parameter("weight").shape
    ((2, 3), (5, 3))
    """

    def __init__(self, *sizes, in_features: int | None = None, out_features: int | None = None, bias: bool = True,
                 weight_init=None, bias_init=None):
        super().__init__()
        if len(sizes) == 3 and isinstance(sizes[2], bool):
            raise TypeError(f"Linear options are keyword-only: Linear({sizes[0]!r}, {sizes[1]!r}, bias={sizes[2]!r})")
        # torch's keywords mean what they mean there: Linear(in_features=3, out_features=4), Linear(3, out_features=4)
        if len(sizes) == 2 and in_features is None and out_features is None:
            in_features, out_features = sizes
        elif len(sizes) == 1 and out_features is None:
            out_features = sizes[0]
        elif len(sizes) == 1 and in_features is None:
            in_features = sizes[0]
        elif sizes:
            raise TypeError(f"Linear takes (out_features) or (in_features, out_features), positionally or by those "
                            f"keywords, each once; got {len(sizes)} positional argument(s) {sizes!r}, "
                            f"in_features={in_features!r}, out_features={out_features!r}. Every other option is "
                            "keyword-only: Linear(3, 4, bias=False)")
        if out_features is None:
            raise TypeError("Linear needs out_features: Linear(out_features) or Linear(in_features, out_features)")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"Linear: {name} must be a positive int, got {v!r}")
        self.out_features = out_features
        self.weight = Parameter((in_features, out_features), order="F",  # (torch: nn.Linear's memory, see Parameter)
                                init=weight_init or _init.kaiming_uniform(math.sqrt(5), nonlinearity="leaky_relu"))
        self.bias = Parameter((out_features,), init=bias_init or _init.zeros()) if bias else None

    @property
    def in_features(self) -> int | None:
        """The input size: known from the constructor, the first input, or a loaded checkpoint."""
        return self.get_parameter("weight").shape[0]

    def build(self, input_shape):
        if not input_shape:
            raise ShapeError(self, "expects inputs with at least one axis (..., in_features), got a scalar")
        if self.in_features is None:
            self.get_parameter("weight").materialize((input_shape[-1], self.out_features))
        elif input_shape[-1] != self.in_features:
            raise self._shape_error(input_shape)

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)

    def diagnose(self, args):
        shape = tuple(getattr(args[0], "shape", ())) if args else ()
        if self.in_features is not None and (not shape or shape[-1] != self.in_features):
            return self._shape_error(shape)
        return floating_input_error(self, args) or super().diagnose(args)

    def _shape_error(self, shape):
        i, o = self.in_features, self.out_features
        return ShapeError(self, f"expected input with last axis {i}, got shape {tuple(shape)}. Linear({i}, {o}) "
                          f"was built for {i} input features; feed (batch, {i}) inputs, or create a new "
                          f"Linear({o}) to infer them from the input.")

    def from_torch_state(self, state: dict) -> dict:
        """``torch.nn.Linear``'s weights in Lamina's layout: its ``weight`` (out, in) becomes (in, out).
        Called by ``lm.load_torch`` with this layer's torch keys as NumPy arrays."""
        w = state.get("weight")
        if w is not None:
            if w.ndim != 2:
                raise ValueError(f"a torch Linear weight is (out_features, in_features), got shape {w.shape}")
            state["weight"] = np.ascontiguousarray(w.T)
        return state

    def extra_repr(self) -> str:
        i = "?" if self.in_features is None else self.in_features
        has_bias = any(name == "bias" for name, _ in self.named_parameters())
        return f"{i} -> {self.out_features}" + ("" if has_bias else ", bias=False")
