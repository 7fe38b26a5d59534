"""Recurrent layers: RNN, GRU and LSTM, batch-first and multi-layer.

Parameter names, layouts and gate orders are torch's (``weight_ih_l0`` (gates * H, in), ``weight_hh_l0``,
``bias_ih_l0``, ``bias_hh_l0``, ...), so a ``torch.nn`` state dict maps one to one. Where the backend has a
fused kernel (torch: ``torch.lstm`` & co., what ``torch.nn.LSTM`` runs) the whole stack is one call;
elsewhere the input projection of every time step is one matmul and the recurrence runs through the
backend's ``scan``, which is ``jax.lax.scan`` under jax, so a compiled step does not grow with the
sequence length.
"""

from __future__ import annotations

import math

from .. import init as _init
from ..errors import ShapeError
from ..module import Module
from ..parameter import Parameter


def _uniform_by_hidden(hidden: int):
    k = 1.0 / math.sqrt(hidden)
    return _init.Initializer(lambda shape, rng: rng.uniform(-k, k, shape), f"uniform(+-1/sqrt({hidden}))")


class _Recurrent(Module):
    _gates = 1

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
        return self._params["weight_ih_l0"].shape[1]

    def build(self, input_shape, *state_shapes):
        if len(input_shape) != 3:
            raise ShapeError(self, f"expects batch-first inputs (N, T, features), got shape {tuple(input_shape)}")
        if self.input_size is None:
            self.get_parameter("weight_ih_l0").materialize((self._gates * self.hidden_size, input_shape[-1]))
        elif input_shape[-1] != self.input_size:
            raise ShapeError(self, f"expected input with last axis {self.input_size}, got shape {tuple(input_shape)}")

    def _layer(self, k: int):
        d = self.__dict__
        return (d[f"weight_ih_l{k}"], d[f"weight_hh_l{k}"], d.get(f"bias_ih_l{k}"), d.get(f"bias_hh_l{k}"))

    def _run(self, x, state0, cell):
        """Every layer over the sequence: x (N, T, F) -> outputs (N, T, H), final states per layer."""
        xp = self._backend.xp
        finals = []
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self._layer(k)
            proj = x @ xp.permute_dims(w_ih, (1, 0))
            if b_ih is not None:
                proj = proj + b_ih
            w_hh_t = xp.permute_dims(w_hh, (1, 0))

            def step(carry, p_t, w_hh_t=w_hh_t, b_hh=b_hh):
                return cell(carry, p_t, w_hh_t, b_hh)

            carry, ys = self._backend.scan(step, state0(k, x), xp.permute_dims(proj, (1, 0, 2)))
            finals.append(carry)
            x = xp.permute_dims(ys, (1, 0, 2))
        return x, finals

    def _fused(self, kind: str, x, state):
        """The backend's native kernel for the whole stack, or None (then the cell runs through scan)."""
        weights = []
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self._layer(k)
            weights += [w_ih, w_hh] + ([b_ih, b_hh] if self.bias else [])
        return self._backend.fused_recurrent(kind, x, state, weights, self.num_layers, self.bias)

    def _zero_state(self, x):
        return self._backend.xp.zeros((self.num_layers, x.shape[0], self.hidden_size), dtype=x.dtype)

    def _zeros(self, x):
        return self._backend.xp.zeros((x.shape[0], self.hidden_size), dtype=x.dtype)

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

    def forward(self, x, h0=None):
        b = self._backend
        fused = self._fused(f"rnn_{self.nonlinearity}", x, self._zero_state(x) if h0 is None else h0)
        if fused is not None:
            return fused
        act = b.tanh if self.nonlinearity == "tanh" else b.relu

        def cell(h, p_t, w_hh_t, b_hh):
            z = p_t + h @ w_hh_t
            h = act(z if b_hh is None else z + b_hh)
            return h, h

        out, finals = self._run(x, lambda k, x: self._zeros(x) if h0 is None else h0[k], cell)
        return out, b.xp.stack(finals)


class GRU(_Recurrent):
    """Gated recurrent unit, torch's gate order (r, z, n):
    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z = sigmoid(W_iz x + b_iz + W_hz h + b_hz),
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h.
    ``forward(x, h0=None)`` returns (outputs (N, T, H), h_n (num_layers, N, H))."""

    _gates = 3

    def forward(self, x, h0=None):
        b = self._backend
        fused = self._fused("gru", x, self._zero_state(x) if h0 is None else h0)
        if fused is not None:
            return fused
        H = self.hidden_size

        def cell(h, p_t, w_hh_t, b_hh):
            hh = h @ w_hh_t
            if b_hh is not None:
                hh = hh + b_hh
            r = b.sigmoid(p_t[:, :H] + hh[:, :H])
            z = b.sigmoid(p_t[:, H:2 * H] + hh[:, H:2 * H])
            n = b.tanh(p_t[:, 2 * H:] + r * hh[:, 2 * H:])
            h = (1 - z) * n + z * h
            return h, h

        out, finals = self._run(x, lambda k, x: self._zeros(x) if h0 is None else h0[k], cell)
        return out, b.xp.stack(finals)


class LSTM(_Recurrent):
    """Long short-term memory, torch's gate order (i, f, g, o): c' = f * c + i * g, h' = o * tanh(c').
    ``forward(x, state=None)`` with state (h0, c0), each (num_layers, N, H), or zeros; returns
    (outputs (N, T, H), (h_n, c_n))."""

    _gates = 4

    def forward(self, x, state=None):
        b = self._backend
        H = self.hidden_size
        if state is not None:
            state = self._convert_inputs(tuple(state))  # (h0, c0) may come as NumPy arrays
        fused = self._fused("lstm", x, (self._zero_state(x), self._zero_state(x)) if state is None else state)
        if fused is not None:
            return fused

        def cell(carry, p_t, w_hh_t, b_hh):
            h, c = carry
            z = p_t + h @ w_hh_t
            if b_hh is not None:
                z = z + b_hh
            i, f = b.sigmoid(z[:, :H]), b.sigmoid(z[:, H:2 * H])
            g, o = b.tanh(z[:, 2 * H:3 * H]), b.sigmoid(z[:, 3 * H:])
            c = f * c + i * g
            h = o * b.tanh(c)
            return (h, c), h

        def state0(k, x):
            return (self._zeros(x), self._zeros(x)) if state is None else (state[0][k], state[1][k])

        out, finals = self._run(x, state0, cell)
        xp = b.xp
        return out, (xp.stack([h for h, _ in finals]), xp.stack([c for _, c in finals]))
