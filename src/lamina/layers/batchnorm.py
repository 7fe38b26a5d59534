"""Batch normalization with running statistics kept as buffers."""

from __future__ import annotations

import numpy as np

from .. import init as _init
from .. import ops
from ..errors import ShapeError
from ..module import Module
from ..parameter import Buffer, Parameter
from .checks import floating_input_error


class _BatchNorm(Module):
    _ranks: tuple = ()

    def __init__(self, num_features: int | None = None, *, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = Parameter((num_features,), init=_init.ones()) if affine else None
        self.bias = Parameter((num_features,), init=_init.zeros()) if affine else None
        self.running_mean = Buffer(shape=(num_features,), init=_init.zeros())
        self.running_var = Buffer(shape=(num_features,), init=_init.ones())
        self.num_batches_tracked = Buffer(np.zeros((), np.int64))

    @property
    def num_features(self) -> int | None:
        return self.get_parameter("running_mean").shape[0]

    def build(self, input_shape):
        if len(input_shape) not in self._ranks:
            raise ShapeError(self, f"expects inputs with {' or '.join(map(str, self._ranks))} axes (N, C, ...), "
                             f"got shape {tuple(input_shape)}")
        c = input_shape[1]
        if self.num_features is not None and c != self.num_features:
            raise ShapeError(self, f"was built for {self.num_features} channels, got shape {tuple(input_shape)}")
        for name, p in [*self.named_parameters(), *self.named_buffers()]:
            if name in ("weight", "bias", "running_mean", "running_var") and not p.is_built:
                p.materialize((c,))

    def forward(self, x):
        y, mean, var = ops.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                      self.training, self.momentum, self.eps)
        if self.training:
            self.running_mean = mean
            self.running_var = var
            self.num_batches_tracked = self.num_batches_tracked + 1
        return y

    def diagnose(self, args):
        shape = tuple(getattr(args[0], "shape", ())) if args else ()
        if len(shape) not in self._ranks or shape[1] != self.num_features:
            return ShapeError(self, f"expects (N, {self.num_features}, ...) with {' or '.join(map(str, self._ranks))}"
                              f" axes, got shape {shape}")
        return floating_input_error(self, args) or super().diagnose(args)

    def extra_repr(self):
        return f"{'?' if self.num_features is None else self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm1d(_BatchNorm):
    """Batch normalization of (N, C) or (N, C, L) inputs over every axis but the channels, as
    ``torch.nn.BatchNorm1d``. In training mode it normalizes with the batch statistics and updates the
    running ones (``running = (1 - momentum) * running + momentum * batch``, unbiased variance); in eval
    mode it normalizes with the running ones. ``weight`` ones and ``bias`` zeros (``affine=False``: none);
    buffers ``running_mean`` (zeros), ``running_var`` (ones), ``num_batches_tracked``. ``C`` is inferred.
    Inside ``lm.fit``'s compiled jax step the running statistics are carried through the program and
    written back after each step.

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); bn = lm.BatchNorm1d(); bn(np.array([[0.0], [2.0]], "float32")).ravel().round(3)
    <lamina backend 'numpy'>
    array([-1.,  1.], dtype=float32)
    """

    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalization of (N, C, H, W) inputs, as ``BatchNorm1d`` (and ``torch.nn.BatchNorm2d``)."""

    _ranks = (4,)
