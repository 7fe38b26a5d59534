"""The array namespace of ``lm.ops``: the Array API standard's functions, and what layer code needs beside them.

Every function finds the namespace of its array arguments (one dictionary lookup on the array's type, cached)
and calls it: ``array_api_compat``'s namespace for numpy and torch, ``jax.numpy`` for jax. Arithmetic and
comparisons go through the standard's operators (``x1 @ x2``, ``x1 + x2``), which every backend implements
natively and which skip the compat layer's type promotion. Names and semantics follow the Array API standard,
NumPy's where the standard is silent (``split``, ``pad``, ``axis=None`` flattening in ``take`` / ``cumsum``).

Creation functions (``zeros``, ``arange``, ...) take ``like=``: an array whose backend, device and dtype family
the new array gets. Without it they use the module whose ``forward`` (or ``__init__``) is calling them, and
outside any module the current backend (``lm.get_backend()``). Floating results default to float32 and
integer results to int64 (int32 on jax without x64) on every backend, so one layer gives the same dtypes
everywhere. ``dtype`` may be a name (``"float16"``), a Python type or the backend's own dtype.

>>> import lamina as lm, numpy as np
>>> x = np.arange(6.0).reshape(2, 3)
>>> lm.ops.flip(lm.ops.permute_dims(x, (1, 0)), axis=0)
array([[2., 5.],
       [1., 4.],
       [0., 3.]])
>>> lm.ops.zeros((2,), like=x)
array([0., 0.])
"""

from __future__ import annotations

import builtins
import math
import sys

import numpy as _np

from ..backends import backend_of, get_backend

__all__ = [
    # creation
    "arange", "empty", "empty_like", "eye", "full", "full_like", "linspace", "meshgrid", "ones",
    "ones_like", "tril", "triu", "zeros", "zeros_like", "one_hot", "sequence_mask",
    # data types and shapes
    "astype", "shape", "ndim", "size", "to_numpy",
    # element-wise
    "abs", "acos", "acosh", "add", "asin", "asinh", "atan", "atan2", "atanh", "bitwise_and", "bitwise_invert",
    "bitwise_left_shift", "bitwise_or", "bitwise_right_shift", "bitwise_xor", "ceil", "clip", "conj", "copysign",
    "cos", "cosh", "divide", "equal", "exp", "expm1", "floor", "floor_divide", "greater", "greater_equal",
    "hypot", "imag", "isfinite", "isinf", "isnan", "less", "less_equal", "log", "log1p", "log2", "log10",
    "logaddexp", "logical_and", "logical_not", "logical_or", "logical_xor", "maximum", "minimum", "multiply",
    "negative", "not_equal", "positive", "pow", "real", "reciprocal", "remainder", "round", "sign", "signbit",
    "sin", "sinh", "square", "sqrt", "subtract", "tan", "trunc", "masked_fill",
    # indexing
    "take", "take_along_axis",
    # linear algebra
    "matmul", "matrix_transpose", "tensordot", "vecdot", "outer", "vector_norm",
    # manipulation
    "broadcast_arrays", "broadcast_to", "concat", "expand_dims", "flip", "moveaxis", "permute_dims", "transpose",
    "swapaxes", "repeat", "reshape", "roll", "squeeze", "stack", "tile", "unstack", "split", "pad",
    # searching
    "argmax", "argmin", "count_nonzero", "nonzero", "searchsorted", "where",
    # sets
    "unique_all", "unique_counts", "unique_inverse", "unique_values",
    # sorting
    "argsort", "sort", "top_k",
    # statistics
    "cumulative_sum", "cumulative_prod", "cumsum", "cumprod", "max", "mean", "min", "prod", "std", "sum", "var",
    # utilities
    "all", "any", "diff",
]

# ----- dispatch ---------------------------------------------------------------------------------------------
_XP: dict[type, object] = {}  # array type -> its namespace
_BK: dict[type, object] = {}  # array type -> its backend adapter


def _resolve(x):
    t = type(x)
    b = backend_of(x)
    if b is None and isinstance(x, _np.generic):  # what NumPy's reductions return: a scalar, not an array
        b = backend_of(_np.asarray(x))
    if b is None:
        raise TypeError(f"lm.ops expected an array of torch, jax or numpy, got {t.__module__}.{t.__qualname__}; "
                        "convert Python values first with lm.ops.asarray(value, like=x)")
    _XP[t], _BK[t] = b.xp, b
    return b


def _xp(x):
    """The Array-API namespace of array ``x`` (cached per type)."""
    try:
        return _XP[type(x)]
    except KeyError:
        return _resolve(x).xp


def _bk(x):
    """The backend adapter of array ``x`` (cached per type)."""
    try:
        return _BK[type(x)]
    except KeyError:
        return _resolve(x)


def _xp_any(*args):
    """The namespace of the first argument that is an array (the others may be Python scalars)."""
    for a in args:
        xp = _XP.get(type(a))
        if xp is not None:
            return xp
    for a in args:
        if not isinstance(a, (int, float, complex, bool)) and a is not None:
            return _xp(a)
    raise TypeError("lm.ops expected at least one array argument, got only Python scalars; "
                    "make one an array with lm.ops.asarray(value)")


def _array(r, xp):
    """``r`` as an array of ``xp`` (NumPy's reductions return scalars; lm.ops always returns arrays)."""
    return r if type(r) in _XP else xp.asarray(r)


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < builtins.max(ndim, 1):
        raise ValueError(f"axis {axis} is out of range for an array of {ndim} dimensions "
                         f"(valid: {-ndim} to {ndim - 1})")
    return axis % builtins.max(ndim, 1)


def _device(x):
    """The native device of ``x`` for the ``device=`` argument of a creation function (None for a tracer)."""
    return getattr(x, "device", None)


# ----- where new arrays go ----------------------------------------------------------------------------------
def _calling_module():
    """The lamina Module whose method called the creation function, looked at over a few frames, or None.

    Only ``self`` of a frame whose first argument is named ``self`` is looked at, so the walk is cheap. A
    module is recognised by the bookkeeping ``Module.__init__`` gives every instance (``_params`` and
    ``_backend`` in its ``__dict__``), not by its class: ``lm.ops`` stands below ``module.py`` and must not
    reach up to it. Beyond 8 frames (or inside a transformation such as ``jax.vmap``) pass ``like=``."""
    f = sys._getframe(3)  # _calling_module <- _place <- the creation function <- its caller
    for _ in range(8):
        if f is None:
            return None
        code = f.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            d = getattr(f.f_locals.get("self"), "__dict__", None)
            if d is not None and "_params" in d and "_backend" in d:
                return f.f_locals["self"]
        f = f.f_back
    return None


def _place(like, device):
    """(backend, native device for ``device=``, lamina device to move the result to) for a new array."""
    if like is not None:
        return _bk(like), (_device(like) if device is None else None), device
    m = _calling_module()
    if m is not None:
        b = get_backend(m.backend)
        if device is None:
            dev = m.device
            device = None if dev == b.default_device() else dev
        return b, None, device
    return get_backend(), None, device


def _moved(b, x, device):
    return x if device is None else b.to_device(x, device)


_DEFAULT = {"float": "float32", "int": "int64", "bool": "bool"}
_PY_TYPES = {float: "float32", int: "int64", bool: "bool", complex: "complex64"}
_dtypes: dict[tuple, object] = {}


def _named(b, name: str):
    key = (b, name)
    dt = _dtypes.get(key)
    if dt is None:
        dt = _dtypes[key] = b.dtype(b.canonical_dtype(name))
    return dt


def _dtype(b, dtype, like=None, kind: str = "float"):
    """The backend's dtype for ``dtype`` (a name, a Python type, a native dtype); when None, ``like``'s dtype
    if it is of the family ``kind`` ("float": real or complex floating, "int"), else the default of ``kind``."""
    if dtype is None:
        if like is not None and kind != "bool":
            family = ("real floating", "complex floating") if kind == "float" else "integral"
            if b.xp.isdtype(like.dtype, family):
                return like.dtype
        return _named(b, _DEFAULT[kind])
    if isinstance(dtype, str):
        return _named(b, dtype)
    if isinstance(dtype, type) and dtype in _PY_TYPES:
        return _named(b, _PY_TYPES[dtype])
    return dtype


def _kind_of(*values) -> str:
    if builtins.any(isinstance(v, float) for v in values):
        return "float"
    if builtins.all(isinstance(v, bool) for v in values):
        return "bool"
    return "int"


def _shape(shape) -> tuple:
    if type(shape) is tuple:
        return shape
    return (int(shape),) if isinstance(shape, (int, _np.integer)) else tuple(int(s) for s in shape)


# ----- creation ---------------------------------------------------------------------------------------------
def arange(start, stop=None, step=1, *, dtype=None, like=None, device=None):
    """Evenly spaced values in [start, stop) with spacing ``step`` (``arange(n)`` is 0 .. n-1).

    Integer arguments give an integer array, any float gives a floating one.

    >>> import lamina as lm, numpy as np
    >>> lm.ops.arange(1, 7, 2, like=np.zeros(1))
    array([1, 3, 5])
    """
    b, nd, dev = _place(like, device)
    dt = _dtype(b, dtype, like, _kind_of(start, stop if stop is not None else 0, step))
    return _moved(b, b.xp.arange(start, stop, step, dtype=dt, device=nd), dev)


def zeros(shape, *, dtype=None, like=None, device=None):
    """An array of ``shape`` filled with 0 (float32 unless ``dtype`` or a floating ``like`` says otherwise).

    >>> import lamina as lm, numpy as np
    >>> lm.ops.zeros((2, 2), like=np.ones(1, "float16")).dtype
    dtype('float16')
    """
    b, nd, dev = _place(like, device)
    return _moved(b, b.xp.zeros(_shape(shape), dtype=_dtype(b, dtype, like), device=nd), dev)


def ones(shape, *, dtype=None, like=None, device=None):
    """An array of ``shape`` filled with 1 (float32 unless ``dtype`` or a floating ``like`` says otherwise)."""
    b, nd, dev = _place(like, device)
    return _moved(b, b.xp.ones(_shape(shape), dtype=_dtype(b, dtype, like), device=nd), dev)


def empty(shape, *, dtype=None, like=None, device=None):
    """An array of ``shape`` with unspecified values (zeros on jax, which has no uninitialized memory)."""
    b, nd, dev = _place(like, device)
    return _moved(b, b.xp.empty(_shape(shape), dtype=_dtype(b, dtype, like), device=nd), dev)


def full(shape, fill_value, *, dtype=None, like=None, device=None):
    """An array of ``shape`` filled with ``fill_value``; its dtype follows the value's kind (bool, int,
    float) unless ``dtype`` is given.

    >>> import lamina as lm, numpy as np
    >>> lm.ops.full((2,), 7, like=np.zeros(1))
    array([7, 7])
    """
    b, nd, dev = _place(like, device)
    dt = _dtype(b, dtype, like, _kind_of(fill_value))
    return _moved(b, b.xp.full(_shape(shape), fill_value, dtype=dt, device=nd), dev)


def eye(n_rows, n_cols=None, *, k: int = 0, dtype=None, like=None, device=None):
    """A (n_rows, n_cols) matrix with ones on the ``k``-th diagonal, zeros elsewhere."""
    b, nd, dev = _place(like, device)
    return _moved(b, b.xp.eye(n_rows, n_cols, k=k, dtype=_dtype(b, dtype, like), device=nd), dev)


def linspace(start, stop, num: int, *, endpoint: bool = True, dtype=None, like=None, device=None):
    """``num`` evenly spaced values from ``start`` to ``stop`` (included unless ``endpoint=False``)."""
    b, nd, dev = _place(like, device)
    dt = _dtype(b, dtype, like)
    return _moved(b, b.xp.linspace(start, stop, num, endpoint=endpoint, dtype=dt, device=nd), dev)


def zeros_like(x, *, dtype=None):
    """Zeros with the shape, dtype and device of ``x``."""
    xp = _xp(x)
    return xp.zeros_like(x, dtype=None if dtype is None else _dtype(_bk(x), dtype))


def ones_like(x, *, dtype=None):
    """Ones with the shape, dtype and device of ``x``."""
    xp = _xp(x)
    return xp.ones_like(x, dtype=None if dtype is None else _dtype(_bk(x), dtype))


def empty_like(x, *, dtype=None):
    """An uninitialized array with the shape, dtype and device of ``x``."""
    xp = _xp(x)
    return xp.empty_like(x, dtype=None if dtype is None else _dtype(_bk(x), dtype))


def full_like(x, fill_value, *, dtype=None):
    """``fill_value`` everywhere, with the shape, dtype and device of ``x``."""
    xp = _xp(x)
    return xp.full_like(x, fill_value, dtype=None if dtype is None else _dtype(_bk(x), dtype))


def tril(x, k: int = 0):
    """``x`` with the elements above the ``k``-th diagonal of its last two axes zeroed."""
    return _xp(x).tril(x, k=k)


def triu(x, k: int = 0):
    """``x`` with the elements below the ``k``-th diagonal of its last two axes zeroed."""
    return _xp(x).triu(x, k=k)


def meshgrid(*arrays, indexing: str = "xy"):
    """Coordinate grids from 1-d arrays (``indexing="xy"``: Cartesian, ``"ij"``: matrix), as a list."""
    return list(_xp(arrays[0]).meshgrid(*arrays, indexing=indexing))


def one_hot(indices, num_classes: int, *, axis: int = -1, dtype=None):
    """A new axis of length ``num_classes`` (at ``axis``) with 1 at each index and 0 elsewhere (float32
    unless ``dtype`` says otherwise). An index outside [0, num_classes) gives a row of zeros.

    >>> import lamina as lm, numpy as np
    >>> lm.ops.one_hot(np.array([2, 0]), 3)
    array([[0., 0., 1.],
           [1., 0., 0.]], dtype=float32)
    """
    xp, b = _xp(indices), _bk(indices)
    classes = xp.arange(num_classes, dtype=indices.dtype, device=_device(indices))
    out = xp.astype(indices[..., None] == classes, _dtype(b, dtype))
    if axis != -1:
        out = xp.moveaxis(out, -1, _axis(axis, out.ndim))
    return out


def sequence_mask(lengths, maxlen: int | None = None):
    """Boolean mask of shape lengths.shape + (maxlen,): True at positions < length (the valid steps of
    padded sequences). ``maxlen`` defaults to ``max(lengths)``, which needs concrete values (give it under
    ``jax.jit``).

    >>> import lamina as lm, numpy as np
    >>> lm.ops.sequence_mask(np.array([1, 3]), 4)
    array([[ True, False, False, False],
           [ True,  True,  True, False]])
    """
    xp = _xp(lengths)
    if maxlen is None:
        maxlen = int(xp.max(lengths))
    steps = xp.arange(maxlen, dtype=lengths.dtype, device=_device(lengths))
    return steps < lengths[..., None]


# ----- data types and shapes --------------------------------------------------------------------------------
def astype(x, dtype, *, copy: bool = True):
    """``x`` converted to ``dtype`` (a name such as ``"float16"``, a Python type or a native dtype)."""
    return _xp(x).astype(x, _dtype(_bk(x), dtype), copy=copy)


def shape(x) -> tuple:
    """The shape of ``x`` as a tuple of Python ints."""
    return tuple(x.shape)


def ndim(x) -> int:
    """The number of axes of ``x``."""
    return len(x.shape)


def size(x) -> int:
    """The number of elements of ``x``."""
    return math.prod(x.shape)


def to_numpy(x) -> _np.ndarray:
    """The values of ``x`` as a NumPy array on the host (a copy from a GPU, a view where it can be)."""
    return _bk(x).to_numpy(x)


# ----- element-wise: unary ----------------------------------------------------------------------------------
def abs(x):
    """|x|, element-wise."""
    return _xp(x).abs(x)


def acos(x):
    """Inverse cosine, element-wise."""
    return _xp(x).acos(x)


def acosh(x):
    """Inverse hyperbolic cosine, element-wise."""
    return _xp(x).acosh(x)


def asin(x):
    """Inverse sine, element-wise."""
    return _xp(x).asin(x)


def asinh(x):
    """Inverse hyperbolic sine, element-wise."""
    return _xp(x).asinh(x)


def atan(x):
    """Inverse tangent, element-wise."""
    return _xp(x).atan(x)


def atanh(x):
    """Inverse hyperbolic tangent, element-wise."""
    return _xp(x).atanh(x)


def bitwise_invert(x):
    """~x, element-wise (integers and booleans)."""
    return _xp(x).bitwise_invert(x)


def ceil(x):
    """The smallest integer >= x, element-wise (same dtype)."""
    return _xp(x).ceil(x)


def conj(x):
    """Complex conjugate, element-wise."""
    return _xp(x).conj(x)


def cos(x):
    """Cosine, element-wise."""
    return _xp(x).cos(x)


def cosh(x):
    """Hyperbolic cosine, element-wise."""
    return _xp(x).cosh(x)


def exp(x):
    """e ** x, element-wise."""
    return _xp(x).exp(x)


def expm1(x):
    """exp(x) - 1, accurate for small x."""
    return _xp(x).expm1(x)


def floor(x):
    """The largest integer <= x, element-wise (same dtype)."""
    return _xp(x).floor(x)


def imag(x):
    """The imaginary part of complex ``x``."""
    return _xp(x).imag(x)


def isfinite(x):
    """True where ``x`` is neither infinite nor NaN."""
    return _xp(x).isfinite(x)


def isinf(x):
    """True where ``x`` is +inf or -inf."""
    return _xp(x).isinf(x)


def isnan(x):
    """True where ``x`` is NaN."""
    return _xp(x).isnan(x)


def log(x):
    """Natural logarithm, element-wise."""
    return _xp(x).log(x)


def log1p(x):
    """log(1 + x), accurate for small x."""
    return _xp(x).log1p(x)


def log2(x):
    """Base-2 logarithm, element-wise."""
    return _xp(x).log2(x)


def log10(x):
    """Base-10 logarithm, element-wise."""
    return _xp(x).log10(x)


def logical_not(x):
    """not x, element-wise (booleans)."""
    return _xp(x).logical_not(x)


def negative(x):
    """-x, element-wise."""
    return -x


def positive(x):
    """+x, element-wise."""
    return +x


def real(x):
    """The real part of complex ``x``."""
    return _xp(x).real(x)


def reciprocal(x):
    """1 / x, element-wise."""
    return 1.0 / x


def round(x):
    """x rounded to the nearest integer, halves to even (as NumPy), same dtype."""
    return _xp(x).round(x)


def sign(x):
    """-1, 0 or 1 by the sign of x, element-wise."""
    return _xp(x).sign(x)


def signbit(x):
    """True where the sign bit of ``x`` is set (negative numbers and -0.0)."""
    return _xp(x).signbit(x)


def sin(x):
    """Sine, element-wise."""
    return _xp(x).sin(x)


def sinh(x):
    """Hyperbolic sine, element-wise."""
    return _xp(x).sinh(x)


def square(x):
    """x * x, element-wise."""
    return x * x


def sqrt(x):
    """Square root, element-wise."""
    return _xp(x).sqrt(x)


def tan(x):
    """Tangent, element-wise."""
    return _xp(x).tan(x)


def trunc(x):
    """x rounded toward zero, element-wise (same dtype)."""
    return _xp(x).trunc(x)


# ----- element-wise: binary (operators where the standard defines one: native on every backend) -----------
def add(x1, x2):
    """x1 + x2 (broadcasting)."""
    return x1 + x2


def subtract(x1, x2):
    """x1 - x2 (broadcasting)."""
    return x1 - x2


def multiply(x1, x2):
    """x1 * x2 (broadcasting)."""
    return x1 * x2


def divide(x1, x2):
    """x1 / x2, true division (broadcasting)."""
    return x1 / x2


def floor_divide(x1, x2):
    """floor(x1 / x2) (broadcasting)."""
    return x1 // x2


def remainder(x1, x2):
    """x1 - floor(x1 / x2) * x2: the remainder with the sign of x2, as Python's % (broadcasting)."""
    return x1 % x2


def pow(x1, x2):
    """x1 ** x2 (broadcasting)."""
    return x1**x2


def equal(x1, x2):
    """x1 == x2, element-wise."""
    return x1 == x2


def not_equal(x1, x2):
    """x1 != x2, element-wise."""
    return x1 != x2


def less(x1, x2):
    """x1 < x2, element-wise."""
    return x1 < x2


def less_equal(x1, x2):
    """x1 <= x2, element-wise."""
    return x1 <= x2


def greater(x1, x2):
    """x1 > x2, element-wise."""
    return x1 > x2


def greater_equal(x1, x2):
    """x1 >= x2, element-wise."""
    return x1 >= x2


def atan2(x1, x2):
    """The angle of the point (x2, x1), in (-pi, pi]."""
    return _xp_any(x1, x2).atan2(x1, x2)


def bitwise_and(x1, x2):
    """x1 & x2, element-wise (integers and booleans)."""
    return _xp_any(x1, x2).bitwise_and(x1, x2)


def bitwise_or(x1, x2):
    """x1 | x2, element-wise (integers and booleans)."""
    return _xp_any(x1, x2).bitwise_or(x1, x2)


def bitwise_xor(x1, x2):
    """x1 ^ x2, element-wise (integers and booleans)."""
    return _xp_any(x1, x2).bitwise_xor(x1, x2)


def bitwise_left_shift(x1, x2):
    """x1 << x2, element-wise (integers)."""
    return _xp_any(x1, x2).bitwise_left_shift(x1, x2)


def bitwise_right_shift(x1, x2):
    """x1 >> x2, element-wise (integers)."""
    return _xp_any(x1, x2).bitwise_right_shift(x1, x2)


def copysign(x1, x2):
    """|x1| with the sign of x2, element-wise."""
    return _xp_any(x1, x2).copysign(x1, x2)


def hypot(x1, x2):
    """sqrt(x1**2 + x2**2) without overflow, element-wise."""
    return _xp_any(x1, x2).hypot(x1, x2)


def logaddexp(x1, x2):
    """log(exp(x1) + exp(x2)), computed stably."""
    return _xp_any(x1, x2).logaddexp(x1, x2)


def logical_and(x1, x2):
    """x1 and x2, element-wise (booleans)."""
    return _xp_any(x1, x2).logical_and(x1, x2)


def logical_or(x1, x2):
    """x1 or x2, element-wise (booleans)."""
    return _xp_any(x1, x2).logical_or(x1, x2)


def logical_xor(x1, x2):
    """x1 xor x2, element-wise (booleans)."""
    return _xp_any(x1, x2).logical_xor(x1, x2)


def maximum(x1, x2):
    """The larger of x1 and x2, element-wise (NaN if either is NaN)."""
    return _xp_any(x1, x2).maximum(x1, x2)


def minimum(x1, x2):
    """The smaller of x1 and x2, element-wise (NaN if either is NaN)."""
    return _xp_any(x1, x2).minimum(x1, x2)


def clip(x, min=None, max=None):
    """x limited to [min, max] (either may be None: no bound on that side)."""
    return _xp(x).clip(x, min, max)


def where(condition, x1, x2):
    """x1 where ``condition`` is true, else x2 (broadcasting; either may be a Python scalar)."""
    return _xp_any(condition, x1, x2).where(condition, x1, x2)


def masked_fill(x, mask, value):
    """A copy of ``x`` with ``value`` where ``mask`` is true (out of place; ``mask`` broadcasts against
    ``x``). The result keeps ``x``'s dtype, as torch's ``Tensor.masked_fill``.

    >>> import lamina as lm, numpy as np
    >>> lm.ops.masked_fill(np.zeros((2, 3)), np.array([True, False, True]), -1.0)
    array([[-1.,  0., -1.],
           [-1.,  0., -1.]])
    """
    xp = _xp(x)
    if type(value) in _XP:
        value = xp.astype(value, x.dtype)
    else:
        value = xp.asarray(value, dtype=x.dtype, device=_device(x))
    return xp.where(mask, value, x)


# ----- indexing ---------------------------------------------------------------------------------------------
def take(x, indices, axis: int | None = None):
    """Elements of ``x`` at integer ``indices`` along ``axis`` (None: of the flattened ``x``, as NumPy).

    >>> import lamina as lm, numpy as np
    >>> lm.ops.take(np.array([[1, 2], [3, 4]]), np.array([1, 1, 0]), axis=1)
    array([[2, 2, 1],
           [4, 4, 3]])
    """
    xp = _xp(x)
    if axis is None:
        x, axis = xp.reshape(x, (-1,)), 0
    if type(indices) not in _XP:
        indices = xp.asarray(indices, device=_device(x))
    if indices.ndim == 1:
        return xp.take(x, indices, axis=axis)
    # the standard's take wants 1-d indices; NumPy's allows any shape: out axis -> indices' axes
    axis = _axis(axis, x.ndim)
    flat = xp.take(x, xp.reshape(indices, (-1,)), axis=axis)
    return xp.reshape(flat, (*x.shape[:axis], *indices.shape, *x.shape[axis + 1:]))


def take_along_axis(x, indices, axis: int = -1):
    """Elements of ``x`` picked along ``axis`` by ``indices`` of the same number of axes (as NumPy)."""
    return _xp(x).take_along_axis(x, indices, axis=axis)


# ----- linear algebra ---------------------------------------------------------------------------------------
def matmul(x1, x2):
    """The matrix product x1 @ x2 (batched over leading axes; 1-d operands as vectors)."""
    r = x1 @ x2
    return r if type(r) in _XP else _array(r, _xp_any(x1, x2))


def matrix_transpose(x):
    """``x`` with its last two axes swapped."""
    return _xp(x).matrix_transpose(x)


def tensordot(x1, x2, axes=2):
    """Sum of products over the last ``axes`` axes of x1 and the first of x2 (or the given axis pairs)."""
    xp = _xp_any(x1, x2)
    return _array(xp.tensordot(x1, x2, axes=axes), xp)


def vecdot(x1, x2, axis: int = -1):
    """Dot product of vectors along ``axis`` (x1 conjugated), broadcasting over the other axes."""
    xp = _xp_any(x1, x2)
    return _array(xp.vecdot(x1, x2, axis=axis), xp)


def outer(x1, x2):
    """The outer product of 1-d x1 and x2: shape (len(x1), len(x2))."""
    xp = _xp_any(x1, x2)
    return xp.reshape(x1, (-1, 1)) * xp.reshape(x2, (1, -1))


def vector_norm(x, axis=None, keepdims: bool = False, ord=2):
    """The ``ord``-norm of ``x`` over ``axis`` (None: all elements): sum(|x|**ord) ** (1/ord)."""
    xp = _xp(x)
    return _array(xp.linalg.vector_norm(x, axis=axis, keepdims=keepdims, ord=ord), xp)


# ----- manipulation -----------------------------------------------------------------------------------------
def broadcast_arrays(*arrays):
    """The arrays broadcast against each other, as a list."""
    return list(_xp(arrays[0]).broadcast_arrays(*arrays))


def broadcast_to(x, shape):
    """``x`` broadcast to ``shape``."""
    return _xp(x).broadcast_to(x, _shape(shape))


def concat(arrays, axis: int | None = 0):
    """The arrays joined along an existing ``axis`` (None: flattened first)."""
    arrays = list(arrays)
    return _xp(arrays[0]).concat(arrays, axis=axis)


def stack(arrays, axis: int = 0):
    """The arrays (all of one shape) joined along a new ``axis``."""
    arrays = list(arrays)
    return _xp(arrays[0]).stack(arrays, axis=axis)


def unstack(x, axis: int = 0):
    """The slices of ``x`` along ``axis``, as a list (the inverse of ``stack``)."""
    return list(_xp(x).unstack(x, axis=axis))


def expand_dims(x, axis=0):
    """``x`` with new axes of length 1 at ``axis`` (an int or a tuple of positions in the result)."""
    xp = _xp(x)
    if isinstance(axis, int):
        return xp.expand_dims(x, axis=axis)
    out_ndim = x.ndim + len(axis)
    for a in sorted(_axis(a, out_ndim) for a in axis):
        x = xp.expand_dims(x, axis=a)
    return x


def squeeze(x, axis=None):
    """``x`` without the length-1 axes ``axis`` (an int, a tuple, or None: all of them)."""
    if axis is None:
        axis = tuple(i for i, s in enumerate(x.shape) if s == 1)
        if not axis:
            return x
    return _xp(x).squeeze(x, axis=axis)


def flip(x, axis=None):
    """``x`` reversed along ``axis`` (an int, a tuple, or None: every axis). Use it instead of
    ``x[::-1]``, which torch does not support."""
    return _xp(x).flip(x, axis=axis)


def roll(x, shift, axis=None):
    """``x`` shifted by ``shift`` along ``axis``, elements wrapping around (None: of the flattened ``x``)."""
    return _xp(x).roll(x, shift, axis=axis)


def permute_dims(x, axes):
    """``x`` with its axes reordered: axis i of the result is axis ``axes[i]`` of ``x``."""
    return _xp(x).permute_dims(x, tuple(axes))


def transpose(x, axes=None):
    """``permute_dims`` (NumPy's name); ``axes=None`` reverses the axes."""
    if axes is None:
        axes = tuple(range(x.ndim - 1, -1, -1))
    return _xp(x).permute_dims(x, tuple(axes))


def swapaxes(x, axis1: int, axis2: int):
    """``x`` with ``axis1`` and ``axis2`` exchanged."""
    n = x.ndim
    perm = list(range(n))
    a, b = _axis(axis1, n), _axis(axis2, n)
    perm[a], perm[b] = b, a
    return _xp(x).permute_dims(x, tuple(perm))


def moveaxis(x, source, destination):
    """``x`` with axes ``source`` moved to positions ``destination`` (ints or tuples), the rest in order."""
    return _xp(x).moveaxis(x, source, destination)


def reshape(x, shape):
    """``x`` with a new ``shape`` of the same size (one entry may be -1: inferred)."""
    return _xp(x).reshape(x, _shape(shape))


def repeat(x, repeats, axis: int | None = None):
    """Each element repeated ``repeats`` times along ``axis`` (an int, or an array of counts per element;
    None: of the flattened ``x``): [a, b] -> [a, a, b, b]."""
    return _xp(x).repeat(x, repeats, axis=axis)


def tile(x, repetitions):
    """``x`` repeated as a whole ``repetitions[i]`` times along axis i: [a, b] -> [a, b, a, b]."""
    reps = (repetitions,) if isinstance(repetitions, int) else tuple(repetitions)
    return _xp(x).tile(x, reps)


def split(x, indices_or_sections, axis: int = 0) -> list:
    """``x`` cut along ``axis`` into a list: into that many equal parts (an int, which must divide the
    length), or at the given indices (a sequence, as NumPy: ``[2, 5]`` gives x[:2], x[2:5], x[5:]).

    >>> import lamina as lm, numpy as np
    >>> [p.tolist() for p in lm.ops.split(np.arange(5), [2, 3])]
    [[0, 1], [2], [3, 4]]
    """
    axis = _axis(axis, x.ndim)
    n = x.shape[axis]
    if isinstance(indices_or_sections, (int, _np.integer)):
        parts = int(indices_or_sections)
        if parts <= 0 or n % parts:
            raise ValueError(f"split: cannot cut an axis of length {n} (axis {axis} of shape {tuple(x.shape)}) "
                             f"into {parts} equal parts; give a number that divides {n}, or the split indices")
        cuts = [i * (n // parts) for i in range(1, parts)]
    else:
        cuts = [int(i) for i in indices_or_sections]
    bounds = [0, *cuts, n]
    lead = (slice(None),) * axis
    return [x[(*lead, slice(builtins.min(a, n), builtins.max(builtins.min(b, n), builtins.min(a, n))))]
            for a, b in zip(bounds[:-1], bounds[1:])]


def _pad_widths(pad_width, ndim: int) -> list:
    p = _np.asarray(pad_width, dtype=_np.int64)
    if p.ndim == 0:
        p = _np.full((ndim, 2), int(p))
    elif p.shape == (2,):
        p = _np.tile(p, (ndim, 1))
    elif p.shape == (1, 2):
        p = _np.tile(p[0], (ndim, 1))
    if p.shape != (ndim, 2) or (p < 0).any():
        raise ValueError(f"pad: pad_width must be an int, a (before, after) pair or one non-negative pair per "
                         f"axis ({ndim} of them), got {pad_width!r}")
    return [(int(a), int(b)) for a, b in p]


def pad(x, pad_width, mode: str = "constant", constant_values=0):
    """``x`` padded as NumPy's ``pad``: ``pad_width`` an int, a (before, after) pair, or one pair per axis;
    ``mode`` "constant" (with ``constant_values``), "edge", "reflect" or "symmetric".

    >>> import lamina as lm, numpy as np
    >>> lm.ops.pad(np.array([1, 2, 3]), (2, 1), mode="reflect")
    array([3, 2, 1, 2, 3, 2])
    """
    xp = _xp(x)
    widths = _pad_widths(pad_width, x.ndim)
    if mode not in ("constant", "edge", "reflect", "symmetric"):
        raise ValueError(f"pad: unknown mode {mode!r}; choose 'constant', 'edge', 'reflect' or 'symmetric'")
    for axis, (before, after) in enumerate(widths):
        if before == after == 0:
            continue
        n = x.shape[axis]
        if mode == "constant":
            parts = []
            for w in (before, after):
                s = list(x.shape)
                s[axis] = w
                parts.append(xp.full(tuple(s), constant_values, dtype=x.dtype, device=_device(x)))
            x = xp.concat([parts[0], x, parts[1]], axis=axis)
            continue
        if mode == "edge" or n == 1:
            idx = _np.clip(_np.arange(-before, n + after), 0, n - 1)
        else:  # reflect about the edge element (reflect) or about the edge itself (symmetric)
            period = 2 * (n - 1) if mode == "reflect" else 2 * n
            i = _np.mod(_np.arange(-before, n + after), period)
            idx = _np.where(i < n, i, period - i - (mode == "symmetric"))
        x = xp.take(x, xp.asarray(idx, device=_device(x)), axis=axis)
    return x


# ----- searching --------------------------------------------------------------------------------------------
def argmax(x, axis: int | None = None, keepdims: bool = False):
    """Index of the largest value along ``axis`` (None: of the flattened ``x``); the first one on ties."""
    xp = _xp(x)
    return _array(xp.argmax(x, axis=axis, keepdims=keepdims), xp)


def argmin(x, axis: int | None = None, keepdims: bool = False):
    """Index of the smallest value along ``axis`` (None: of the flattened ``x``); the first one on ties."""
    xp = _xp(x)
    return _array(xp.argmin(x, axis=axis, keepdims=keepdims), xp)


def count_nonzero(x, axis=None, keepdims: bool = False):
    """How many elements of ``x`` are not zero, over ``axis`` (None: all)."""
    xp = _xp(x)
    return _array(xp.count_nonzero(x, axis=axis, keepdims=keepdims), xp)


def nonzero(x) -> tuple:
    """The indices of the non-zero elements, one array per axis (data-dependent shape: not under jit)."""
    return tuple(_xp(x).nonzero(x))


def searchsorted(x1, x2, *, side: str = "left"):
    """Where each value of ``x2`` would go into the sorted 1-d ``x1`` to keep it sorted."""
    return _xp(x1).searchsorted(x1, x2, side=side)


# ----- sets (data-dependent shapes: not under jit) ----------------------------------------------------------
def unique_values(x):
    """The distinct values of ``x``, sorted, as a 1-d array."""
    return _xp(x).unique_values(x)


def unique_counts(x):
    """(values, counts) of the distinct values of ``x``."""
    return _xp(x).unique_counts(x)


def unique_inverse(x):
    """(values, inverse_indices): ``values[inverse_indices]`` rebuilds ``x``."""
    return _xp(x).unique_inverse(x)


def unique_all(x):
    """(values, indices, inverse_indices, counts) of the distinct values of ``x``; ``indices``: the first
    occurrence of each value in the flattened ``x``."""
    xp = _xp(x)
    try:
        return xp.unique_all(x)
    except NotImplementedError:  # a namespace without it (array_api_compat's torch): from unique_inverse
        values, inverse = xp.unique_inverse(x)
        inverse = xp.reshape(inverse, (-1,))
        n, dev = inverse.shape[0], _device(x)
        hit = xp.reshape(inverse, (1, -1)) == xp.reshape(xp.arange(values.shape[0], device=dev), (-1, 1))
        pos = xp.reshape(xp.arange(n, device=dev), (1, -1))
        indices = xp.min(xp.where(hit, pos, n), axis=1)
        counts = xp.sum(xp.astype(hit, indices.dtype), axis=1)
        return values, indices, xp.reshape(inverse, x.shape), counts


# ----- sorting ----------------------------------------------------------------------------------------------
def sort(x, axis: int = -1, *, descending: bool = False, stable: bool = True):
    """``x`` sorted along ``axis``."""
    return _xp(x).sort(x, axis=axis, descending=descending, stable=stable)


def argsort(x, axis: int = -1, *, descending: bool = False, stable: bool = True):
    """The indices that sort ``x`` along ``axis``; equal values keep their order when ``stable``."""
    return _xp(x).argsort(x, axis=axis, descending=descending, stable=stable)


def top_k(x, k: int, axis: int = -1):
    """(values, indices) of the ``k`` largest elements along ``axis``, largest first; on ties the lower
    index comes first, on every backend.

    >>> import lamina as lm, numpy as np
    >>> lm.ops.top_k(np.array([1.0, 3.0, 2.0, 3.0]), 2)
    (array([3., 3.]), array([1, 3]))
    """
    xp = _xp(x)
    axis = _axis(axis, x.ndim)
    if not 0 <= k <= x.shape[axis]:
        raise ValueError(f"top_k: k={k} is out of range for axis {axis} of length {x.shape[axis]}")
    idx = xp.argsort(x, axis=axis, descending=True, stable=True)
    idx = idx[(slice(None),) * axis + (slice(0, k),)]
    return xp.take_along_axis(x, idx, axis=axis), idx


# ----- statistics -------------------------------------------------------------------------------------------
def sum(x, axis=None, keepdims: bool = False, *, dtype=None):
    """The sum over ``axis`` (an int, a tuple, or None: all elements)."""
    xp = _xp(x)
    dt = None if dtype is None else _dtype(_bk(x), dtype)
    return _array(xp.sum(x, axis=axis, keepdims=keepdims, dtype=dt), xp)


def prod(x, axis=None, keepdims: bool = False, *, dtype=None):
    """The product over ``axis`` (an int, a tuple, or None: all elements)."""
    xp = _xp(x)
    dt = None if dtype is None else _dtype(_bk(x), dtype)
    return _array(xp.prod(x, axis=axis, keepdims=keepdims, dtype=dt), xp)


def mean(x, axis=None, keepdims: bool = False):
    """The arithmetic mean over ``axis`` (an int, a tuple, or None: all elements).

    As the Array API standard specifies, ``x`` must be floating-point (or complex): an integer or boolean
    array is a ``TypeError`` naming its dtype on every backend (torch refused, jax gave float32, numpy
    float64, tensorflow an integer mean). Cast first: ``lm.ops.mean(lm.ops.astype(x, "float32"))``.
    """
    xp = _xp(x)
    dtype = _bk(x).dtype_name(x)
    if not dtype.startswith(("float", "bfloat", "complex")):
        raise TypeError(f"lm.ops.mean: takes floating-point input (as the Array API standard's mean), got dtype "
                        f"{dtype}; cast it first, e.g. lm.ops.mean(lm.ops.astype(x, 'float32'))")
    return _array(xp.mean(x, axis=axis, keepdims=keepdims), xp)


def max(x, axis=None, keepdims: bool = False):
    """The largest value over ``axis`` (an int, a tuple, or None: all elements)."""
    xp = _xp(x)
    return _array(xp.max(x, axis=axis, keepdims=keepdims), xp)


def min(x, axis=None, keepdims: bool = False):
    """The smallest value over ``axis`` (an int, a tuple, or None: all elements)."""
    xp = _xp(x)
    return _array(xp.min(x, axis=axis, keepdims=keepdims), xp)


def var(x, axis=None, keepdims: bool = False, *, correction: float = 0.0):
    """The variance over ``axis``: sum((x - mean)**2) / (N - correction) (0: biased, 1: unbiased)."""
    xp = _xp(x)
    return _array(xp.var(x, axis=axis, keepdims=keepdims, correction=correction), xp)


def std(x, axis=None, keepdims: bool = False, *, correction: float = 0.0):
    """The standard deviation over ``axis``: sqrt(var(x, correction=correction))."""
    xp = _xp(x)
    return _array(xp.std(x, axis=axis, keepdims=keepdims, correction=correction), xp)


def cumulative_sum(x, axis: int | None = None, *, include_initial: bool = False):
    """Running sums along ``axis`` (may be None for a 1-d ``x``); ``include_initial``: start with a 0."""
    return _xp(x).cumulative_sum(x, axis=axis, include_initial=include_initial)


def cumulative_prod(x, axis: int | None = None, *, include_initial: bool = False):
    """Running products along ``axis`` (may be None for a 1-d ``x``); ``include_initial``: start with a 1."""
    return _xp(x).cumulative_prod(x, axis=axis, include_initial=include_initial)


def cumsum(x, axis: int | None = None):
    """Running sums along ``axis`` (NumPy's name; None: of the flattened ``x``)."""
    xp = _xp(x)
    if axis is None:
        x, axis = xp.reshape(x, (-1,)), 0
    return xp.cumulative_sum(x, axis=axis)


def cumprod(x, axis: int | None = None):
    """Running products along ``axis`` (NumPy's name; None: of the flattened ``x``)."""
    xp = _xp(x)
    if axis is None:
        x, axis = xp.reshape(x, (-1,)), 0
    return xp.cumulative_prod(x, axis=axis)


# ----- utilities --------------------------------------------------------------------------------------------
def all(x, axis=None, keepdims: bool = False):
    """True where every element over ``axis`` is true (non-zero)."""
    xp = _xp(x)
    return _array(xp.all(x, axis=axis, keepdims=keepdims), xp)


def any(x, axis=None, keepdims: bool = False):
    """True where some element over ``axis`` is true (non-zero)."""
    xp = _xp(x)
    return _array(xp.any(x, axis=axis, keepdims=keepdims), xp)


def diff(x, axis: int = -1, n: int = 1):
    """The ``n``-th forward difference along ``axis``: x[i + 1] - x[i], applied ``n`` times."""
    return _xp(x).diff(x, axis=axis, n=n)
