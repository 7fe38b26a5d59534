"""Containers: ``Sequential``, ``ModuleList`` and ``ModuleDict``.

A plain list, tuple or dict of layers assigned to a module attribute becomes a ``ModuleList`` or
``ModuleDict``, so its layers are registered (PyTorch silently drops them).
"""

from __future__ import annotations

from ..module import ModuleDict, ModuleList

__all__ = ["Sequential", "ModuleList", "ModuleDict"]


class Sequential(ModuleList):
    """Layers applied one after the other: ``Sequential(a, b, c)(x) == c(b(a(x)))``.

    Built from layers as arguments or as one list. Shape contract: whatever the chain gives.

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); net = lm.Sequential(lm.Linear(256), lm.ReLU(), lm.Linear(10))
    <lamina backend 'numpy'>
    >>> net(np.zeros((2, 20), "float32")).shape
    (2, 10)
    """

    def __init__(self, *layers):
        if len(layers) == 1 and isinstance(layers[0], list | tuple):
            layers = tuple(layers[0])
        super().__init__(layers)

    def forward(self, x):
        for layer in self:
            x = layer(x)
        return x
