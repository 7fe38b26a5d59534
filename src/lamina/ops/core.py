"""Core helpers for array code that runs on every backend (as ``keras.ops.core``): converting inputs to
the backend of a reference array, the Array-API namespace of an array, and argument tuples.

>>> import lamina as lm, numpy as np
>>> lm.ops.asarray([1.0, 2.0], like=np.zeros(1, np.float32)).dtype
dtype('float32')
>>> lm.ops.int_tuple(3, 2, "kernel_size")
(3, 3)
"""

from __future__ import annotations

import numpy as np

from ..backends import backend_of, get_backend
from ..errors import BackendError

__all__ = ["asarray", "namespace", "int_tuple"]

_HOST_TYPES = (np.ndarray, np.generic, list, tuple, int, float, bool, complex)
# type -> backend adapter: one dict lookup per op call on the hot path (``backend_of`` on a miss)
_by_type: dict = {}


def _backend(x):
    """The adapter of array ``x``'s backend; a ``BackendError`` for anything that is not an array."""
    b = _by_type.get(type(x))
    if b is None:
        b = backend_of(x)
        if b is None:
            raise BackendError(f"expected an array of torch, jax or numpy, got {type(x).__name__}")
        _by_type[type(x)] = b
    return b


def asarray(x, like=None):
    """``x`` as an array of the backend (and on the device) of the array ``like``; without ``like``, of the
    current backend (``lm.set_backend``) on its default device.

    An array of that backend comes back as it is (on the numpy backend, any NumPy array). NumPy arrays,
    NumPy scalars, Python numbers and (nested) lists are converted, float64 to float32 (as model inputs
    are). An array of another backend is a ``BackendError``: move it, or the model, explicitly.

    >>> import lamina as lm, numpy as np
    >>> lm.ops.asarray([[1.0, 2.0]], like=np.zeros(1, np.float32)).dtype
    dtype('float32')
    """
    if like is None:
        b, device = get_backend(), None
    else:
        b = _backend(like)
        if type(x) is type(like):
            return x
        device = b.device_of(like)
    if b.is_native(x):
        return x
    other = None if isinstance(x, _HOST_TYPES) else backend_of(x)
    if other is not None:
        raise BackendError(f"expected a {b.array_name} (or a NumPy array or list), got a {other.array_name}; "
                           f"convert it first, or move the model with model.to(backend={other.name!r})")
    arr = np.asarray(x)
    if arr.dtype.kind not in "biufc":
        raise TypeError(f"cannot make a {b.array_name} of {type(x).__name__} with dtype {arr.dtype}; "
                        "pass numbers (bool, int, float or complex)")
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return b.from_numpy(arr, device, copy=False) if arr is not x else b.from_numpy(arr, device)


def namespace(x):
    """The Array API standard namespace of ``x``'s backend (``array_api_compat``'s), for generic array code:
    ``xp = lm.ops.namespace(x); xp.concat([...])``.

    >>> import lamina as lm, numpy as np
    >>> lm.ops.namespace(np.zeros(2)).sum(np.ones(3))
    np.float64(3.0)
    """
    return _backend(x).xp


def int_tuple(value, n: int, name: str = "value") -> tuple:
    """``value`` as a tuple of ``n`` non-negative ints: an int is repeated (``3`` -> ``(3, 3)``), a sequence
    must have ``n`` of them. A ``ValueError`` naming ``name`` otherwise. For per-axis layer arguments such
    as ``kernel_size``, ``stride``, ``dilation``."""
    t = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else tuple(
        value if isinstance(value, list | tuple) else (value,))
    if len(t) != n or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in t):
        raise ValueError(f"{name} must be a non-negative int or a tuple of {n} of them, got {value!r}")
    return t
