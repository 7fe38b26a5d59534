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
    position gives a layer, a slice a new ``Sequential`` sharing the layers (names kept). ``seq[i] = layer``
    replaces a layer in place; ``del seq[i]``, ``pop(i)`` and ``insert(i, layer)`` renumber the layers
    ``"0"``, ``"1"``, ... afterwards, exactly as ``torch.nn.Sequential`` does.
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

    def __setitem__(self, i, layer: Module) -> None:
        """Replace the layer at position ``i`` (or name ``i``); it keeps that name and place, as in torch."""
        if not isinstance(layer, Module):
            raise TypeError(f"Sequential holds layers (lm.Module), got {type(layer).__name__}")
        name = self._name_at(i)
        self._register([(k, layer if k == name else v) for k, v in self._order.items()])  # the place is kept

    def __delitem__(self, i) -> None:
        """Remove the layer(s) at position ``i`` (an int or a slice); as ``torch.nn.Sequential`` does, the
        remaining layers are then renumbered ``"0"``, ``"1"``, ... (custom names too), so state-dict keys
        follow the new positions."""
        names = list(self._order)
        doomed = names[i] if isinstance(i, slice) else [self._name_at(i)]
        kept = [layer for name, layer in self._order.items() if name not in doomed]
        self._renumber(kept)

    def insert(self, index: int, layer: Module) -> Sequential:
        """Insert ``layer`` before position ``index`` (``-len <= index <= len``), as ``torch.nn.Sequential.insert``:
        the layers from ``index`` on move one place up and are renumbered (names ``"0"``, ``"1"``, ...)."""
        if not isinstance(layer, Module):
            raise TypeError(f"Sequential holds layers (lm.Module), got {type(layer).__name__}")
        n = len(self._order)
        if not isinstance(index, int) or isinstance(index, bool) or not -n <= index <= n:
            raise IndexError(f"Sequential.insert: index {index!r} out of range for {n} layers; use -{n}..{n}")
        layers = list(self._order.values())
        layers.insert(index + n if index < 0 else index, layer)
        self._renumber(layers)
        return self

    def pop(self, i=-1) -> Module:
        """Remove and return the layer at position ``i`` (default the last); the rest are renumbered, as torch."""
        layer = self[i]
        del self[i]
        return layer

    def _name_at(self, i) -> str:
        names = list(self._order)
        if isinstance(i, str):
            if i not in self._order:
                raise KeyError(f"Sequential has no layer named {i!r}; its layers are {names}")
            return i
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"Sequential indices are ints (or slices for deletion), got {type(i).__name__}")
        try:
            return names[i]
        except IndexError:
            raise IndexError(f"Sequential index {i} out of range for {len(names)} layers") from None

    def _renumber(self, layers: list) -> None:
        """Register ``layers`` as the children ``"0"``, ``"1"``, ... (torch's numbering after an insert or a
        deletion)."""
        self._register([(str(k), layer) for k, layer in enumerate(layers)])

    def _register(self, items: list) -> None:
        """Make ``items`` ((name, layer) pairs) the children, in this order: the old registrations are dropped
        first, so the registration order (state-dict keys) and the run order are both the new one."""
        for name in list(self._order):
            delattr(self, name)
        for name, layer in items:
            self.add_module(name, layer)

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self):
        return iter(self._layers)
