"""Recurrent layers: RNN, GRU and LSTM, batch-first and multi-layer.

Parameter names, layouts and gate orders are torch's (``weight_ih_l0`` (gates * H, in), ``weight_hh_l0``,
``bias_ih_l0``, ``bias_hh_l0``, ...), so a ``torch.nn`` state dict maps one to one. Where the backend has a
fused kernel (torch: ``torch.lstm`` & co., what ``torch.nn.LSTM`` runs) the whole stack is one call;
elsewhere the input projection of every time step is one matmul and the recurrence runs through
``lm.ops.scan``, which is ``jax.lax.scan`` under jax, so a compiled step does not grow with the
sequence length. Both are ``lm.ops.recurrent``, which checks the input and state sizes before any
kernel runs.
"""

from __future__ import annotations

import math

from .. import init as _init
from .. import ops
from ..errors import ShapeError
from ..module import Module
from ..parameter import Parameter


def _uniform_by_hidden(hidden: int):
    k = 1.0 / math.sqrt(hidden)
    return _init.Initializer(lambda shape, rng: rng.uniform(-k, k, shape), f"uniform(+-1/sqrt({hidden}))")


class _Recurrent(Module):
    _gates = 1
    _kind = ""

    def __init__(self, hidden_size: int, num_layers: int = 1, *, input_size: int | None = None, bias: bool = True):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {v!r}")
        self.hidden_size, self.num_layers = hidden_size, num_layers
        g, h, init = self._gates * hidden_size, hidden_size, _uniform_by_hidden(hidden_size)
        for k in range(num_layers):
            setattr(self, f"weight_ih_l{k}", Parameter((g, input_size if k == 0 else h), init=init))
            setattr(self, f"weight_hh_l{k}", Parameter((g, h), init=init))
            if bias:
                setattr(self, f"bias_ih_l{k}", Parameter((g,), init=init))
                setattr(self, f"bias_hh_l{k}", Parameter((g,), init=init))
        self.bias = bias

    @property
    def input_size(self) -> int | None:
        """The number of input features: given, inferred from the first input, or from a loaded checkpoint."""
        return self.get_parameter("weight_ih_l0").shape[1]

    def build(self, input_shape, *state_shapes):
        if len(input_shape) != 3:
            raise ShapeError(self, f"expects batch-first inputs (N, T, features), got shape {tuple(input_shape)}")
        if self.input_size is None:
            self.get_parameter("weight_ih_l0").materialize((self._gates * self.hidden_size, input_shape[-1]))
        elif input_shape[-1] != self.input_size:
            raise ShapeError(self, f"expected input with last axis {self.input_size}, got shape {tuple(input_shape)}")

    def _weights(self) -> list:
        """Per layer (w_ih, w_hh, b_ih, b_hh), the biases None without ``bias``: what ``ops.recurrent`` takes."""
        return [(getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}"),
                 getattr(self, f"bias_ih_l{k}", None), getattr(self, f"bias_hh_l{k}", None))
                for k in range(self.num_layers)]

    def _run(self, x, state):
        try:
            return ops.recurrent(x, self._weights(), state, self._kind)
        except ValueError as e:  # sizes that do not fit: say so in the layer's terms
            better = self._size_error(x, state)
            if better is None:
                raise
            raise better from e

    def _size_error(self, x, state):
        """A ShapeError naming what this layer was built for, or None when the sizes fit."""
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 3 or shape[-1] != self.input_size:
            return ShapeError(self, f"was built for {self.input_size} input features: expected input (N, T, "
                              f"{self.input_size}), got shape {shape}. Feed (N, T, {self.input_size}) inputs, or "
                              f"create a new {type(self).__name__}({self.hidden_size}) to infer the size.")
        expected = (self.num_layers, shape[0], self.hidden_size)
        states = () if state is None else tuple(state) if self._kind == "lstm" else (state,)
        for s in states:
            got = tuple(getattr(s, "shape", ()))
            if got != expected:
                return ShapeError(self, f"expected each state of shape (num_layers, N, hidden_size) = {expected}, "
                                  f"got {got}")
        return None

    def diagnose(self, args):
        return (self._size_error(args[0], args[1] if len(args) > 1 else None) if args else None) or \
            super().diagnose(args)

    def extra_repr(self):
        i = "?" if self.input_size is None else self.input_size
        return f"{i} -> {self.hidden_size}, num_layers={self.num_layers}" + ("" if self.bias else ", bias=False")


class RNN(_Recurrent):
    """Elman RNN: h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh) (``nonlinearity="relu"``: relu).

    ``forward(x, h0=None)``: x (N, T, in), h0 (num_layers, N, H) or zeros; returns (outputs (N, T, H),
    h_n (num_layers, N, H)). Parameters as ``torch.nn.RNN``, all U[-1/sqrt(H), 1/sqrt(H)].

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); out, h = lm.RNN(4, num_layers=2)(np.zeros((3, 5, 2), "float32"))
    <lamina backend 'numpy'>
    >>> out.shape, h.shape
    ((3, 5, 4), (2, 3, 4))
    """

    def __init__(self, hidden_size: int, num_layers: int = 1, *, nonlinearity: str = "tanh",
                 input_size: int | None = None, bias: bool = True):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(hidden_size, num_layers, input_size=input_size, bias=bias)
        self.nonlinearity = nonlinearity
        self._kind = f"rnn_{nonlinearity}"

    def forward(self, x, h0=None):
        return self._run(x, h0)


class GRU(_Recurrent):
    """Gated recurrent unit, torch's gate order (r, z, n):
    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z = sigmoid(W_iz x + b_iz + W_hz h + b_hz),
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h.
    ``forward(x, h0=None)`` returns (outputs (N, T, H), h_n (num_layers, N, H))."""

    _gates = 3
    _kind = "gru"

    def forward(self, x, h0=None):
        return self._run(x, h0)


class LSTM(_Recurrent):
    """Long short-term memory, torch's gate order (i, f, g, o): c' = f * c + i * g, h' = o * tanh(c').
    ``forward(x, state=None)`` with state (h0, c0), each (num_layers, N, H) (NumPy is fine), or zeros;
    returns (outputs (N, T, H), (h_n, c_n))."""

    _gates = 4
    _kind = "lstm"

    def forward(self, x, state=None):
        return self._run(x, state)
