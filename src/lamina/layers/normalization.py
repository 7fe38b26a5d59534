"""Normalization over the last axis: ``LayerNorm`` and ``RMSNorm`` (sized lazily from the input)."""

from __future__ import annotations

from .. import init as _init
from .. import ops
from ..errors import ShapeError
from ..module import Module
from ..parameter import Parameter
from .checks import floating_input_error


class LayerNorm(Module):
    """(x - mean) / sqrt(var + eps) * weight + bias, statistics over the last axis (biased variance, as
    torch). Shape contract: (..., d) -> (..., d); ``d`` inferred unless given. Parameters ``weight`` (d,)
    ones and ``bias`` (d,) zeros (``affine=False``: none).

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); lm.LayerNorm()(np.array([[1.0, 3.0]], "float32")).round(4)
    <lamina backend 'numpy'>
    array([[-1.,  1.]], dtype=float32)
    """

    def __init__(self, features: int | None = None, *, normalized_shape=None, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        features = _features(features, normalized_shape, "LayerNorm")
        self.eps = eps
        self.weight = Parameter((features,), init=_init.ones()) if affine else None
        self.bias = Parameter((features,), init=_init.zeros()) if affine else None

    def build(self, input_shape):
        _build_last_axis(self, input_shape)

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def diagnose(self, args):
        return _last_axis_error(self, args) or floating_input_error(self, args) or super().diagnose(args)

    def extra_repr(self):
        return f"eps={self.eps}"


class RMSNorm(Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis. Shape contract: (..., d) -> (..., d).
    Parameter ``weight`` (d,) ones (``affine=False``: none)."""

    def __init__(self, features: int | None = None, *, normalized_shape=None, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        features = _features(features, normalized_shape, "RMSNorm")
        self.eps = eps
        self.weight = Parameter((features,), init=_init.ones()) if affine else None

    def build(self, input_shape):
        _build_last_axis(self, input_shape)

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)

    def diagnose(self, args):
        return _last_axis_error(self, args) or floating_input_error(self, args) or super().diagnose(args)

    def extra_repr(self):
        return f"eps={self.eps}"


def _features(features, normalized_shape, name: str):
    """``features``, or torch's ``normalized_shape`` (an int or a 1-tuple: Lamina normalizes the last axis)."""
    if normalized_shape is None:
        return features
    if features is not None:
        raise TypeError(f"{name} takes the size once, as features or normalized_shape (torch's name); got "
                        f"features={features!r}, normalized_shape={normalized_shape!r}")
    if isinstance(normalized_shape, tuple | list):
        if len(normalized_shape) != 1:
            raise ValueError(f"{name} normalizes the last axis only: normalized_shape must be an int or a 1-tuple, "
                             f"got {normalized_shape!r}; flatten the axes first, or write {name}({{last axis}})")
        normalized_shape = normalized_shape[0]
    return normalized_shape


def _build_last_axis(layer, input_shape):
    if not input_shape:
        raise ShapeError(layer, "expects inputs with at least one axis (..., features), got a scalar")
    for _, p in layer.named_parameters():
        if not p.is_built:
            p.materialize((input_shape[-1],))
        elif p.shape[0] != input_shape[-1]:
            raise ShapeError(layer, f"was built for {p.shape[0]} features, got shape {tuple(input_shape)}")


def _last_axis_error(layer, args):
    shape = tuple(getattr(args[0], "shape", ())) if args else ()
    for _, p in layer.named_parameters():
        if p.is_built and (not shape or shape[-1] != p.shape[0]):
            return ShapeError(layer, f"expected input with last axis {p.shape[0]}, got shape {shape}")
    return None
