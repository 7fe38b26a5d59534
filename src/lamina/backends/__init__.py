"""Backend registry: which backend new modules use, and which backend an array belongs to.

A backend's library is imported the first time that backend is used, never by ``import lamina``.
The current backend is, in order: the last ``set_backend(name)``, the ``LAMINA_BACKEND`` environment
variable, the first installed of torch, jax, tensorflow and numpy.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from ..errors import BackendError
from .base import Backend

__all__ = ["Backend", "get_backend", "set_backend", "devices", "backend_of", "available_backends", "BACKENDS"]

BACKENDS = ("torch", "jax", "tensorflow", "numpy")
_CLASSES = {"numpy": ("numpy", "NumpyBackend"), "torch": ("torch", "TorchBackend"), "jax": ("jax", "JaxBackend"),
            "tensorflow": ("tensorflow", "TensorflowBackend")}
# which backend owns an array, by the top-level package of the array's type
_PACKAGE_TO_BACKEND = {"numpy": "numpy", "torch": "torch", "jax": "jax", "jaxlib": "jax", "tensorflow": "tensorflow"}

_loaded: dict[str, Backend] = {}
_current: str | None = None
_by_type: dict[type, Backend] = {}


def available_backends() -> list[str]:
    """The backends whose library is installed, in order of preference (nothing is imported)."""
    return [b for b in BACKENDS if importlib.util.find_spec(b) is not None]


def get_backend(name: str | Backend | None = None) -> Backend:
    """The adapter for ``name`` (default: the current backend), importing its library on first use."""
    if isinstance(name, Backend):
        return name
    if name is None:
        name = _current or _default_name()
    b = _loaded.get(name)
    if b is not None:
        return b
    if name not in _CLASSES:
        raise BackendError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
    if importlib.util.find_spec(name) is None:
        raise BackendError(
            f"the {name} backend needs the {name!r} package, which is not installed; "
            f"install it with: pip install 'lamina[{name}]'"
        )
    module, cls = _CLASSES[name]
    b = getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
    _loaded[name] = b
    return b


def set_backend(name: str) -> Backend:
    """Choose the backend for modules created from now on (``"torch"``, ``"jax"``, ``"tensorflow"`` or ``"numpy"``).

    Existing modules keep theirs; move one with ``model.to(backend=...)``.

    >>> import lamina as lm
    >>> lm.set_backend("numpy").name
    'numpy'
    """
    global _current
    b = get_backend(name)
    _current = b.name
    return b


def devices(backend: str | None = None) -> list[str]:
    """The devices a backend offers (default: the current one): ``["cpu"]``, plus ``"cuda:0"``, ... on a GPU.

    >>> import lamina as lm
    >>> lm.devices("numpy")
    ['cpu']
    """
    return get_backend(backend).devices()


def _default_name() -> str:
    env = os.environ.get("LAMINA_BACKEND")
    if env:
        if env not in BACKENDS:
            raise BackendError(f"LAMINA_BACKEND={env!r} is not a backend; choose one of {list(BACKENDS)}")
        return env
    return available_backends()[0]


def backend_of(x) -> Backend | None:
    """The backend that owns array ``x``, or ``None`` when ``x`` is not an array of a known backend."""
    t = type(x)
    b = _by_type.get(t)
    if b is not None:
        return b
    name = _PACKAGE_TO_BACKEND.get(t.__module__.partition(".")[0])
    if name is None:
        return None
    b = get_backend(name)
    if not b.is_native(x):
        return None
    _by_type[t] = b
    return b
