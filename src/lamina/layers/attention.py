"""Multi-head attention."""

from __future__ import annotations

import math

import numpy as np

from .. import init as _init
from .. import ops
from ..errors import ShapeError
from ..module import Module
from ..parameter import Parameter
from .checks import floating_input_error


class MultiHeadAttention(Module):
    """Multi-head scaled dot-product attention, batch first: query (N, Lq, E), key and value (N, Lk, E)
    (default: the query, i.e. self-attention) -> (N, Lq, E).

    ``forward(query, key=None, value=None, key_padding_mask=None, causal=False)``: ``key_padding_mask``
    (N, Lk) is True where a key is padding (torch's convention); ``causal=True`` lets position i attend
    only positions <= i. Parameters as ``torch.nn.MultiheadAttention``: ``in_proj_weight`` (3E, E)
    Glorot uniform and ``in_proj_bias`` (3E,) zeros (query, key, value projections stacked, rows are
    outputs), ``out_proj_weight`` (E, E) and ``out_proj_bias`` (E,) zeros. The attention itself is
    ``torch.nn.functional.scaled_dot_product_attention`` / ``jax.nn.dot_product_attention``.

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); lm.MultiHeadAttention(8, 2)(np.zeros((2, 5, 8), "float32")).shape
    <lamina backend 'numpy'>
    (2, 5, 8)
    """

    def __init__(self, embed_dim: int, num_heads: int, *, bias: bool = True):
        super().__init__()
        if not isinstance(embed_dim, int) or not isinstance(num_heads, int) or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"MultiHeadAttention: embed_dim={embed_dim!r} must be a multiple of "
                             f"num_heads={num_heads!r}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        e = embed_dim
        self.in_proj_weight = Parameter((3 * e, e), init=_init.xavier_uniform())
        self.out_proj_weight = Parameter((e, e), init=_init.kaiming_uniform(math.sqrt(5), nonlinearity="leaky_relu"))
        self.in_proj_bias = Parameter((3 * e,), init=_init.zeros()) if bias else None
        self.out_proj_bias = Parameter((e,), init=_init.zeros()) if bias else None

    def forward(self, query, key=None, value=None, key_padding_mask=None, causal: bool = False):
        key = query if key is None else ops.asarray(key, like=query)  # keywords arrive unconverted
        value = key if value is None else ops.asarray(value, like=query)
        xp = ops.namespace(query)
        e, h = self.embed_dim, self.num_heads
        w, bias = self.in_proj_weight, self.in_proj_bias

        def project(x, i):
            y = x @ xp.permute_dims(w[i * e:(i + 1) * e], (1, 0))
            y = y if bias is None else y + bias[i * e:(i + 1) * e]
            return xp.reshape(y, (x.shape[0], x.shape[1], h, e // h))

        q, k, v = project(query, 0), project(key, 1), project(value, 2)
        mask = ops.attention_mask(q, k, key_padding_mask, causal)
        out = xp.reshape(ops.attention(q, k, v, mask), (query.shape[0], query.shape[1], e))
        out = out @ xp.permute_dims(self.out_proj_weight, (1, 0))
        return out if self.out_proj_bias is None else out + self.out_proj_bias

    def from_torch_state(self, state: dict) -> dict:
        """``torch.nn.MultiheadAttention``'s weights under Lamina's names: its child ``out_proj.weight`` /
        ``out_proj.bias`` become ``out_proj_weight`` / ``out_proj_bias``; separate ``q_proj_weight``,
        ``k_proj_weight``, ``v_proj_weight`` (all (E, E)) are stacked into ``in_proj_weight``. Layouts are
        torch's already (rows are outputs). Called by ``lm.load_torch`` with NumPy arrays."""
        for torch_name, ours in (("out_proj.weight", "out_proj_weight"), ("out_proj.bias", "out_proj_bias")):
            if torch_name in state:
                state[ours] = state.pop(torch_name)
        parts = [state.get(f"{c}_proj_weight") for c in "qkv"]
        if all(p is not None for p in parts):
            if len({p.shape for p in parts}) != 1:
                raise ValueError("MultiHeadAttention needs key and value of the query's size (kdim = vdim = "
                                 f"embed_dim); got q/k/v projections of shapes {[p.shape for p in parts]}")
            for c in "qkv":
                del state[f"{c}_proj_weight"]
            state["in_proj_weight"] = np.concatenate(parts, axis=0)
        return state

    def diagnose(self, args):
        shapes = [tuple(getattr(a, "shape", ())) for a in args[:3] if a is not None]
        for shape in shapes:
            if len(shape) != 3 or shape[-1] != self.embed_dim:
                return ShapeError(self, f"expects query, key and value of shape (N, L, {self.embed_dim}), got "
                                  f"shapes {', '.join(map(str, shapes))}")
        if len(shapes) > 1 and (shapes[1][0] != shapes[0][0] or (len(shapes) > 2 and shapes[2][:2] != shapes[1][:2])):
            return ShapeError(self, f"expects key and value (N, Lk, E) with the query's N, got shapes "
                              f"{', '.join(map(str, shapes))}")
        return floating_input_error(self, args) or super().diagnose(args)

    def extra_repr(self):
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
