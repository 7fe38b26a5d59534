"""Normalization over the last axis: ``LayerNorm`` and ``RMSNorm`` (sized lazily from the input)."""

from __future__ import annotations

from .. import init as _init
from ..module import Module
from ..parameter import Parameter


class LayerNorm(Module):
    """(x - mean) / sqrt(var + eps) * weight + bias, statistics over the last axis (biased variance, as
    torch). Shape contract: (..., d) -> (..., d); ``d`` inferred unless given. Parameters ``weight`` (d,)
    ones and ``bias`` (d,) zeros (``affine=False``: none).

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); lm.LayerNorm()(np.array([[1.0, 3.0]], "float32")).round(4)
    <lamina backend 'numpy'>
    array([[-1.,  1.]], dtype=float32)
    """

    def __init__(self, features: int | None = None, *, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = Parameter((features,), init=_init.ones()) if affine else None
        self.bias = Parameter((features,), init=_init.zeros()) if affine else None

    def build(self, input_shape):
        for name in ("weight", "bias"):
            p = self._params.get(name)
            if p is not None and not p.is_built:
                p.materialize((input_shape[-1],))

    def forward(self, x):
        return self._backend.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"eps={self.eps}"


class RMSNorm(Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis. Shape contract: (..., d) -> (..., d).
    Parameter ``weight`` (d,) ones (``affine=False``: none)."""

    def __init__(self, features: int | None = None, *, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = Parameter((features,), init=_init.ones()) if affine else None

    def build(self, input_shape):
        p = self._params.get("weight")
        if p is not None and not p.is_built:
            p.materialize((input_shape[-1],))

    def forward(self, x):
        return self._backend.rms_norm(x, self.weight, self.eps)

    def extra_repr(self):
        return f"eps={self.eps}"
