"""Containers: ``Sequential``, ``ModuleList`` and ``ModuleDict``.

A plain list, tuple or dict of layers assigned to a module attribute becomes a ``ModuleList`` or
``ModuleDict``, so its layers are registered (PyTorch silently drops them).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..module import Module, ModuleDict, ModuleList

__all__ = ["Sequential", "ModuleList", "ModuleDict"]


class Sequential(Module):
    """Layers applied one after the other, in registration order: ``Sequential(a, b, c)(x) == c(b(a(x)))``.

    Built as ``torch.nn.Sequential`` is: from layers as arguments (named ``"0"``, ``"1"``, ...), from one
    list, or from one ordered mapping of names to layers (``Sequential(OrderedDict(conv=..., act=...))``,
    whose names are the registration names: state-dict keys ``conv.weight``, ...). A layer assigned
    later as an attribute (``seq.extra = layer``) or through ``add_module``/``append`` is registered and,
    as in torch, run after the others; re-assigning an existing name keeps its place. Indexing by
    position gives a layer, a slice a new ``Sequential`` sharing the layers (names kept).
    Shape contract: whatever the chain gives.

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); net = lm.Sequential(lm.Linear(256), lm.ReLU(), lm.Linear(10))
    <lamina backend 'numpy'>
    >>> net(np.zeros((2, 20), "float32")).shape
    (2, 10)
    """

    def __init__(self, *layers):
        super().__init__()
        self.__dict__["_order"] = {}   # name -> layer, in torch's order (a re-assigned name keeps its place)
        self.__dict__["_layers"] = ()  # the same layers as a tuple: what forward walks
        if len(layers) == 1 and isinstance(layers[0], Mapping):
            items = list(layers[0].items())
        else:
            if len(layers) == 1 and isinstance(layers[0], list | tuple):
                layers = tuple(layers[0])
            items = [(str(i), layer) for i, layer in enumerate(layers)]
        for name, layer in items:
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential holds layers (lm.Module); got {type(layer).__name__} for {name!r}. "
                                "Pass layers, a list of layers, or one mapping of names to layers.")
            self.add_module(name, layer)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        order = self.__dict__.get("_order")
        if order is None:
            return
        if isinstance(value, Module):
            order[name] = value
        elif name in order:
            del order[name]
        else:
            return
        self.__dict__["_layers"] = tuple(order.values())

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        order = self.__dict__.get("_order")
        if order is not None and order.pop(name, None) is not None:
            self.__dict__["_layers"] = tuple(order.values())

    def forward(self, x):
        for layer in self._layers:
            x = layer(x)
        return x

    def append(self, layer: Module) -> Sequential:
        """Add a layer at the end, under the next free index (as ``torch.nn.Sequential.append``)."""
        if not isinstance(layer, Module):
            raise TypeError(f"Sequential holds layers (lm.Module), got {type(layer).__name__}")
        self.add_module(str(len(self._order)), layer)
        return self

    def extend(self, layers) -> Sequential:
        """Append each of ``layers``."""
        for layer in layers:
            self.append(layer)
        return self

    def __getitem__(self, i):
        if isinstance(i, slice):
            return type(self)(dict(list(self._order.items())[i]))
        if isinstance(i, str):
            return self._order[i]
        try:
            return self._layers[i]
        except IndexError:
            raise IndexError(f"Sequential index {i} out of range for {len(self._layers)} layers") from None

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self):
        return iter(self._layers)
