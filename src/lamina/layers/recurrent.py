"""Recurrent layers: RNN, GRU and LSTM, multi-layer, optionally bidirectional.

Constructors as torch's: ``GRU(hidden_size)`` (input size inferred from the first input) or
``GRU(input_size, hidden_size)``; every other option is keyword-only: ``num_layers=1``, ``bias=True``,
``bidirectional=False``, ``batch_first=True`` (Lamina's default: inputs (N, T, F); ``batch_first=False``
takes torch's default time-major (T, N, F)). Parameter names, layouts and gate orders are torch's
(``weight_ih_l0`` (gates * H, in), ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ..., and
``weight_ih_l0_reverse``, ... for the reverse direction), so a ``torch.nn`` state dict maps one to one.
Bidirectional outputs are (N, T, 2H), forward half first, and states (2 * num_layers, N, H), as torch's.
Where the backend has a fused kernel (torch: ``torch.lstm`` & co., what ``torch.nn.LSTM`` runs) the
whole stack is one call; elsewhere the input projection of every time step is one matmul and the recurrence runs through
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

    def __init__(self, *sizes, hidden_size: int | None = None, input_size: int | None = None, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = True, bidirectional: bool = False, **unknown):
        super().__init__()
        name = type(self).__name__
        if unknown:
            raise TypeError(f"{name}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; its "
                            "options are hidden_size, input_size, num_layers, bias, batch_first, bidirectional"
                            + (", nonlinearity" if name == "RNN" else ""))
        if len(sizes) > 2 or (len(sizes) == 2 and (input_size is not None or hidden_size is not None)) or \
                (len(sizes) == 1 and hidden_size is not None):
            raise TypeError(f"{name} takes (hidden_size) or (input_size, hidden_size) positionally, as "
                            f"torch.nn.{name} does; got {len(sizes)} positional argument(s) {sizes!r}"
                            f"{' and keywords for the same sizes' if len(sizes) <= 2 else ''}. Every other option "
                            f"is keyword-only: {name}(64, num_layers=2, bidirectional=True)")
        if len(sizes) == 2:
            input_size, hidden_size = sizes
        elif len(sizes) == 1:
            hidden_size = sizes[0]
        elif hidden_size is None:
            raise TypeError(f"{name} needs hidden_size: {name}(hidden_size) or {name}(input_size, hidden_size)")
        for what, v in (("hidden_size", hidden_size), ("num_layers", num_layers)) + \
                ((("input_size", input_size),) if input_size is not None else ()):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: {what} must be a positive int, got {v!r}")
        for what, v in (("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional)):
            if not isinstance(v, bool):
                raise TypeError(f"{name}: {what} must be True or False, got {v!r}")
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.batch_first, self.bidirectional = batch_first, bidirectional
        dirs = 2 if bidirectional else 1
        g, h, init = self._gates * hidden_size, hidden_size, _uniform_by_hidden(hidden_size)
        for k in range(num_layers):  # torch's names and order: per layer, then per direction
            for suffix in self._suffixes():
                setattr(self, f"weight_ih_l{k}{suffix}", Parameter((g, input_size if k == 0 else h * dirs),
                                                                   init=init))
                setattr(self, f"weight_hh_l{k}{suffix}", Parameter((g, h), init=init))
                if bias:
                    setattr(self, f"bias_ih_l{k}{suffix}", Parameter((g,), init=init))
                    setattr(self, f"bias_hh_l{k}{suffix}", Parameter((g,), init=init))
        self.bias = bias

    def _suffixes(self) -> tuple:
        return ("", "_reverse") if self.bidirectional else ("",)

    @property
    def input_size(self) -> int | None:
        """The number of input features: given, inferred from the first input, or from a loaded checkpoint."""
        return self.get_parameter("weight_ih_l0").shape[1]

    def build(self, input_shape, *state_shapes):
        if len(input_shape) != 3:
            layout = "batch-first inputs (N, T, features)" if self.batch_first else \
                "time-major inputs (T, N, features) (batch_first=False)"
            raise ShapeError(self, f"expects {layout}, got shape {tuple(input_shape)}")
        if self.input_size is None:
            for suffix in self._suffixes():
                self.get_parameter(f"weight_ih_l0{suffix}").materialize((self._gates * self.hidden_size,
                                                                         input_shape[-1]))
        elif input_shape[-1] != self.input_size:
            raise ShapeError(self, f"expected input with last axis {self.input_size}, got shape {tuple(input_shape)}")

    def _weights(self) -> list:
        """Per layer (w_ih, w_hh, b_ih, b_hh), the biases None without ``bias``: what ``ops.recurrent`` takes."""
        return [(getattr(self, f"weight_ih_l{k}{d}"), getattr(self, f"weight_hh_l{k}{d}"),
                 getattr(self, f"bias_ih_l{k}{d}", None), getattr(self, f"bias_hh_l{k}{d}", None))
                for k in range(self.num_layers) for d in self._suffixes()]

    def _run(self, x, state):
        try:
            if self.batch_first:
                return ops.recurrent(x, self._weights(), state, self._kind, self.bidirectional)
            out, state = ops.recurrent(ops.permute_dims(x, (1, 0, 2)), self._weights(), state, self._kind,
                                       self.bidirectional)
            return ops.permute_dims(out, (1, 0, 2)), state
        except ValueError as e:  # sizes that do not fit: say so in the layer's terms
            better = self._size_error(x, state)
            if better is None:
                raise
            raise better from e

    def _size_error(self, x, state):
        """A ShapeError naming what this layer was built for, or None when the sizes fit."""
        shape = tuple(getattr(x, "shape", ()))
        axes = "N, T" if self.batch_first else "T, N"
        if len(shape) != 3 or shape[-1] != self.input_size:
            return ShapeError(self, f"was built for {self.input_size} input features: expected input ({axes}, "
                              f"{self.input_size}), got shape {shape}. Feed ({axes}, {self.input_size}) inputs, or "
                              f"create a new {type(self).__name__}({self.hidden_size}) to infer the size.")
        dirs = 2 if self.bidirectional else 1
        expected = (self.num_layers * dirs, shape[0 if self.batch_first else 1], self.hidden_size)
        states = () if state is None else tuple(state) if self._kind == "lstm" else (state,)
        for s in states:
            got = tuple(getattr(s, "shape", ()))
            if got != expected:
                what = "2 * num_layers" if self.bidirectional else "num_layers"
                return ShapeError(self, f"expected each state of shape ({what}, N, hidden_size) = {expected}, "
                                  f"got {got}")
        return None

    def diagnose(self, args):
        return (self._size_error(args[0], args[1] if len(args) > 1 else None) if args else None) or \
            super().diagnose(args)

    def extra_repr(self):
        i = "?" if self.input_size is None else self.input_size
        return (f"{i} -> {self.hidden_size}, num_layers={self.num_layers}" + ("" if self.bias else ", bias=False")
                + (", bidirectional=True" if self.bidirectional else "")
                + ("" if self.batch_first else ", batch_first=False"))


class RNN(_Recurrent):
    """Elman RNN: h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh) (``nonlinearity="relu"``: relu).

    ``RNN(hidden_size)`` or ``RNN(input_size, hidden_size)``, then keyword-only ``num_layers``,
    ``nonlinearity``, ``bias``, ``bidirectional``, ``batch_first`` (see the module's docstring).
    ``forward(x, h0=None)``: x (N, T, in), h0 (num_layers * directions, N, H) or zeros; returns (outputs
    (N, T, directions * H), h_n (num_layers * directions, N, H)). Parameters as ``torch.nn.RNN``, all
    U[-1/sqrt(H), 1/sqrt(H)].

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); out, h = lm.RNN(4, num_layers=2)(np.zeros((3, 5, 2), "float32"))
    <lamina backend 'numpy'>
    >>> out.shape, h.shape
    ((3, 5, 4), (2, 3, 4))
    """

    def __init__(self, *sizes, nonlinearity: str = "tanh", **options):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(*sizes, **options)
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
