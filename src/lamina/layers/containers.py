"""Containers: ``Sequential``, ``ModuleList`` and ``ModuleDict``.

A plain list, tuple or dict of layers assigned to a module attribute becomes a ``ModuleList`` or
``ModuleDict``, so its layers are registered (PyTorch silently drops them).
"""

from __future__ import annotations

from ..module import Module


class ModuleList(Module):
    """A list of layers that registers them under the keys ``"0"``, ``"1"``, ...

    Supports indexing (an int gives a layer, a slice a new container sharing the layers), ``len``,
    iteration and ``append``/``extend``.

    >>> import lamina as lm
    >>> blocks = lm.ModuleList([lm.ReLU(), lm.Tanh()]); len(blocks)
    2
    """

    def __init__(self, layers=()):
        super().__init__()
        self.__dict__["_seq"] = ()
        self.extend(layers)

    def append(self, layer: Module) -> ModuleList:
        """Add a layer at the end (registered under the next index)."""
        if not isinstance(layer, Module):
            raise TypeError(f"{type(self).__name__} holds layers (lm.Module), got {type(layer).__name__}")
        self._register_module(str(len(self._seq)), layer)
        self.__dict__["_seq"] = self._seq + (layer,)
        return self

    def extend(self, layers) -> ModuleList:
        """Append each of ``layers``."""
        for layer in layers:
            self.append(layer)
        return self

    def __getitem__(self, i):
        if isinstance(i, slice):
            return type(self)(self._seq[i])
        try:
            return self._seq[i]
        except IndexError:
            raise IndexError(f"{type(self).__name__} index {i} out of range for {len(self._seq)} layers") from None

    def __len__(self) -> int:
        return len(self._seq)

    def __iter__(self):
        return iter(self._seq)

    def forward(self, *args):
        raise NotImplementedError(
            f"{type(self).__name__} only holds layers; use lm.Sequential to chain them, or call each one")


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
        for layer in self._seq:
            x = layer(x)
        return x


class ModuleDict(Module):
    """A dict of layers, registered under their keys.

    >>> import lamina as lm
    >>> heads = lm.ModuleDict({"a": lm.ReLU()}); list(heads)
    ['a']
    """

    def __init__(self, layers=None):
        super().__init__()
        for k, v in dict(layers or {}).items():
            self[k] = v

    def __setitem__(self, key: str, layer: Module) -> None:
        if not isinstance(key, str) or "." in key or not key:
            raise ValueError(f"{type(self).__name__} keys are non-empty strings without '.', got {key!r}")
        if not isinstance(layer, Module):
            raise TypeError(f"{type(self).__name__} holds layers (lm.Module), got {type(layer).__name__}")
        self._unregister(key)
        self._register_module(key, layer)

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __contains__(self, key) -> bool:
        return key in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def keys(self):
        """The layer names."""
        return self._modules.keys()

    def values(self):
        """The layers."""
        return self._modules.values()

    def items(self):
        """``(name, layer)`` pairs."""
        return self._modules.items()

    def forward(self, *args):
        raise NotImplementedError(f"{type(self).__name__} only holds layers; call them by key")
