"""The TensorFlow backend. Parameter values are ``tf.Variable``s, so inside ``forward`` ``self.weight`` is
what TensorFlow code expects, ``tf.GradientTape`` sees it, and a model traces under ``tf.function``
(the train step, SavedModel and TFLite export).

TensorFlow has no Array API namespace (``array_api_compat`` covers numpy, torch, jax, cupy, dask); the
adapter's ``xp`` is a small shim over ``tf.experimental.numpy`` with the standard's names
(``concat``, ``permute_dims``, ``astype``, ``isdtype``, ...). The textbook's layers call NumPy-style
methods on their inputs (``X.mean()``), which ``tf.Tensor`` lacks; on first use the adapter adds
NumPy's array methods to ``tf.Tensor`` (TensorFlow's own ``enable_numpy_methods_on_tensor``, plus
``sum``, ``prod``, ``std``, ``var``, ``any``, ``all``, ``argmax``, ``argmin``) and to ``tf.Variable``.
That is the backend's one global change to TensorFlow; it leaves TensorFlow's type promotion alone.
"""

from __future__ import annotations

import contextlib
import math
import os

# TensorFlow 2.21's oneDNN kernels abort the process (tensor.cc "Check failed: IsAligned()") on a transpose
# of a variable assigned from host data; the plain Eigen kernels do not. Effective only when lamina's
# tensorflow backend is what imports tensorflow first.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.experimental import numpy as tnp  # noqa: E402

from ..errors import BackendError  # noqa: E402
from .base import Backend, normalise_device  # noqa: E402

_EagerTensor = type(tf.constant(0.0))


def _add_numpy_methods() -> None:
    """NumPy's array methods on tf.Tensor and tf.Variable (where TensorFlow has none of that name)."""
    from tensorflow.python.framework import tensor as _tensor
    from tensorflow.python.ops import resource_variable_ops
    from tensorflow.python.ops.numpy_ops import np_math_ops

    cls = _tensor.Tensor
    if not hasattr(cls, "mean"):
        np_math_ops.enable_numpy_methods_on_tensor()
    extra = {"sum": tnp.sum, "prod": tnp.prod, "std": tnp.std, "var": tnp.var, "any": tnp.any, "all": tnp.all,
             "argmax": tnp.argmax, "argmin": tnp.argmin, "cumsum": tnp.cumsum, "squeeze": tnp.squeeze,
             "swapaxes": tnp.swapaxes}
    for name, fn in extra.items():
        if not hasattr(cls, name):
            setattr(cls, name, fn)
    var = resource_variable_ops.BaseResourceVariable
    for name in ("mean", "max", "min", "reshape", "transpose", "flatten", "ravel", "clip", "astype", *extra):
        if not hasattr(var, name):
            setattr(var, name, _delegate(name))
    for name in ("T", "ndim", "size"):
        if not hasattr(var, name):
            setattr(var, name, property(lambda self, n=name: getattr(tf.convert_to_tensor(self), n)))
    if not hasattr(var, "__pos__"):
        var.__pos__ = lambda self: tf.identity(self)
    for klass in (cls, tf.Variable):
        if not getattr(klass.__matmul__, "_lamina", False):
            klass.__matmul__, klass.__rmatmul__ = _vector_matmul(klass.__matmul__, klass.__rmatmul__)
    if not getattr(cls.reshape, "_lamina", False):
        cls.reshape = _reshape_method(cls.reshape)


def _reshape_method(reshape):
    """``x.reshape(...)`` as NumPy's, with the sizes a traced tensor's static shape leaves unknown (``None``:
    ``x.reshape(x.shape[0], -1)`` under lm.export's batch of any size) taken at run time (``_known``)."""

    def method(x, *shape, **kwargs):
        target = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
        if any(d is None for d in target):
            return reshape(x, _known(x, target), **kwargs)
        return reshape(x, *shape, **kwargs)

    method._lamina = True
    return method


def _known(x, shape) -> list:
    """A reshape target without ``None`` (a size read from the static shape of a tensor traced with an axis
    of unknown size): a single one becomes -1; where there are more (or a -1 besides), each ``None`` is the
    run-time size of ``x``'s axis at its position, as in ``x.reshape(x.shape[0], -1)``, which keeps the
    leading axes (and the -1 is worked out from the known sizes, so the result keeps a static shape)."""
    if any(d is None for d in shape[len(x.shape):]):
        raise ValueError(f"reshape: cannot tell the sizes of {tuple(shape)} for a tensor of shape {tuple(x.shape)} "
                         "(None: unknown while tracing); use -1 for one axis, or sizes from tf.shape(x)")
    if all(d is None or isinstance(d, int | np.integer) for d in shape):  # plain sizes (no tensors among them)
        if sum(d is None for d in shape) == 1 and -1 not in shape:
            return [-1 if d is None else d for d in shape]
        kept = [x.shape[i] for i in range(len(x.shape)) if i >= len(shape) or shape[i] is not None]
        if -1 in shape and None not in kept:
            rest = math.prod(kept) // math.prod(d for d in shape if d is not None and d != -1)
            shape = [rest if d == -1 else d for d in shape]
    dynamic = tf.shape(x)
    return [dynamic[i] if d is None else d for i, d in enumerate(shape)]


def _vector_matmul(matmul, rmatmul):
    """``@`` as NumPy's for 1-d operands (TensorFlow's needs two matrices): the native operator first, the
    vector case only when it refused, so a matrix product costs what it did."""

    def __matmul__(a, b):
        try:
            return matmul(a, b)
        except (ValueError, tf.errors.InvalidArgumentError):
            if len(a.shape) >= 2 and len(getattr(b, "shape", ())) >= 2:
                raise
            return tnp.matmul(a, b)

    def __rmatmul__(a, b):
        try:
            return rmatmul(a, b)
        except (ValueError, tf.errors.InvalidArgumentError):
            if len(a.shape) >= 2 and len(getattr(b, "shape", ())) >= 2:
                raise
            return tnp.matmul(b, a)

    __matmul__._lamina = __rmatmul__._lamina = True
    return __matmul__, __rmatmul__


def _delegate(name):
    def method(self, *args, **kwargs):
        return getattr(tf.convert_to_tensor(self), name)(*args, **kwargs)

    method.__name__ = name
    return method


def _tf_device(device: str) -> str:
    """Lamina's device name ("cpu", "cuda:1") as TensorFlow's ("/CPU:0", "/GPU:1")."""
    if device == "cpu":
        return "/CPU:0"
    kind, _, idx = device.partition(":")
    return f"/{'GPU' if kind == 'cuda' else kind.upper()}:{idx or 0}"


def _dev(device):
    """A ``tf.device`` scope for a creation function's ``device=`` (a native device string, or None)."""
    return tf.device(device) if device else contextlib.nullcontext()


def _tensor(x, like=None):
    """``x`` as a tensor; a Python scalar takes ``like``'s dtype (as the standard's scalar operands do)."""
    if tf.is_tensor(x) or isinstance(x, tf.Variable):
        return x
    if like is not None and isinstance(x, bool | int | float | complex):
        return tf.constant(x, tf.as_dtype(like.dtype))
    return _Namespace.asarray(x)


def _pair(x1, x2):
    if not (tf.is_tensor(x1) or isinstance(x1, tf.Variable)):
        x2 = _tensor(x2)
        return _tensor(x1, x2), x2
    return x1, _tensor(x2, x1)


def _axes(axis):
    return list(axis) if isinstance(axis, tuple | list) else axis


def _count(x, axis):
    """How many elements a reduction over ``axis`` combines (a tensor when the shape is not static)."""
    shape = x.shape
    axes = range(len(shape)) if axis is None else ([axis] if isinstance(axis, int) else axis)
    dims = [shape[a] for a in axes]
    if all(d is not None for d in dims):
        return math.prod(dims)
    s = tf.shape(x)
    return tf.reduce_prod(tf.gather(s, [a % len(shape) for a in axes]))


def _unary(name, fn, ints=None):
    """An element-wise function; ``ints``: what it does to integer (and bool) input, where the float kernel
    has none (``ceil`` of an integer is the integer)."""
    if ints is None:
        f = lambda x: fn(_tensor(x))  # noqa: E731
    else:
        def f(x):
            x = _tensor(x)
            return ints(x) if x.dtype.is_integer or x.dtype == tf.bool else fn(x)
    f.__name__ = name
    return staticmethod(f)


def _binary(name, fn):
    def f(x1, x2):
        return fn(*_pair(x1, x2))

    f.__name__ = name
    return staticmethod(f)


_LN2, _LN10 = math.log(2.0), math.log(10.0)
_BITS = {tf.float16: tf.int16, tf.bfloat16: tf.int16, tf.float32: tf.int32, tf.float64: tf.int64}


def _signbit(x):
    if x.dtype in _BITS:
        return tf.bitcast(x, _BITS[x.dtype]) < 0  # -0.0 and -nan too, as the standard says
    return x < 0


def _trunc(x):
    return tf.where(x < 0, tf.math.ceil(x), tf.math.floor(x))


def _invert(x):
    return tf.logical_not(x) if x.dtype == tf.bool else tf.bitwise.invert(x)


def _copysign(x1, x2):
    return tf.where(_signbit(x2), -tf.abs(x1), tf.abs(x1))


def _hypot(x1, x2):
    a, b = tf.abs(x1), tf.abs(x2)
    m = tf.maximum(a, b)
    safe = tf.where(m > 0, m, tf.ones_like(m))  # scaled by the larger one: no overflow in the squares
    return tf.where(m > 0, m * tf.sqrt(tf.square(a / safe) + tf.square(b / safe)), m)


def _logaddexp(x1, x2):
    m = tf.maximum(x1, x2)
    finite = tf.math.is_finite(m)
    d = tf.where(finite, -tf.abs(x1 - x2), tf.zeros_like(m))
    return tf.where(finite, m + tf.math.log1p(tf.exp(d)), m)


def _bitwise(fn, on_bool):
    def f(x1, x2):
        return on_bool(x1, x2) if x1.dtype == tf.bool else fn(x1, x2)

    return f


class _Linalg:
    """``xp.linalg``: the part of the standard's linear algebra extension that Lamina uses."""

    @staticmethod
    def vector_norm(x, axis=None, keepdims=False, ord=2):
        x = _tensor(x)
        axis = _axes(axis)
        a = tf.abs(x)
        if ord == 2:
            return tf.sqrt(tf.reduce_sum(tf.square(a), axis, keepdims))
        if ord == 1:
            return tf.reduce_sum(a, axis, keepdims)
        if ord == math.inf:
            return tf.reduce_max(a, axis, keepdims)
        if ord == -math.inf:
            return tf.reduce_min(a, axis, keepdims)
        if ord == 0:
            return tf.cast(tf.math.count_nonzero(a, axis, keepdims), x.dtype)
        return tf.reduce_sum(a**ord, axis, keepdims) ** (1.0 / ord)

    @staticmethod
    def matmul(x1, x2):
        return _Namespace.matmul(x1, x2)

    @staticmethod
    def matrix_transpose(x):
        return tf.linalg.matrix_transpose(x)

    @staticmethod
    def vecdot(x1, x2, axis=-1):
        return _Namespace.vecdot(x1, x2, axis=axis)


class _Namespace:
    """An Array API namespace for TensorFlow (the 2023.12 functions that ``lm.ops`` calls, with the
    standard's signatures: ``axis=`` tuples, ``keepdims=``, ``device=``, ``correction=``, ``descending=``,
    ``include_initial=``), written over ``tf`` ops so that every function has a gradient and traces under
    ``tf.function``. Names the standard does not have fall through to ``tf.experimental.numpy``.

    Defaults as elsewhere in Lamina: Python floats become float32, integer ranges int64."""

    __array_api_version__ = "2023.12"
    linalg = _Linalg()

    bool = tf.bool
    int8, int16, int32, int64 = tf.int8, tf.int16, tf.int32, tf.int64
    uint8, uint16, uint32, uint64 = tf.uint8, tf.uint16, tf.uint32, tf.uint64
    float16, bfloat16, float32, float64 = tf.float16, tf.bfloat16, tf.float32, tf.float64
    complex64, complex128 = tf.complex64, tf.complex128
    e, pi, inf, nan, newaxis = math.e, math.pi, math.inf, math.nan, None

    def __getattr__(self, name):
        return getattr(tnp, name)

    # ----- creation --------------------------------------------------------------------------------------
    @staticmethod
    def asarray(x, dtype=None, device=None, copy=None):
        with _dev(device):
            if tf.is_tensor(x) or isinstance(x, tf.Variable):
                x = x if dtype is None or x.dtype == dtype else tf.cast(x, dtype)
                return tf.identity(x) if copy else tf.convert_to_tensor(x)
            a = np.asarray(x)
            if dtype is not None:  # NumPy's conversion (2.7 -> int 2), which tf.constant refuses
                return tf.constant(a.astype(tf.as_dtype(dtype).as_numpy_dtype, copy=False))
            if isinstance(x, np.ndarray | np.generic):
                return tf.constant(a)
            # Python values: bool, int64 or float32 (TensorFlow would pick int32 for ints)
            return tf.constant(a, {"f": tf.float32, "i": tf.int64, "u": tf.int64, "c": tf.complex64}.get(a.dtype.kind))

    @staticmethod
    def arange(start, stop=None, step=1, *, dtype=None, device=None):
        if stop is None:
            start, stop = 0, start
        if dtype is None:
            dtype = tf.float32 if any(isinstance(v, float) for v in (start, stop, step)) else tf.int64
        with _dev(device):
            if tf.as_dtype(dtype).is_floating:  # the count NumPy gives, values start + i * step (as NumPy)
                n = max(0, math.ceil((stop - start) / step))
                return tf.cast(start + tf.range(n, dtype=tf.float64) * step, dtype)
            return tf.range(start, stop, step, dtype=dtype)

    @staticmethod
    def zeros(shape, *, dtype=None, device=None):
        with _dev(device):
            return tf.zeros(shape, dtype or tf.float32)

    @staticmethod
    def ones(shape, *, dtype=None, device=None):
        with _dev(device):
            return tf.ones(shape, dtype or tf.float32)

    empty = zeros  # TensorFlow has no uninitialized memory

    @staticmethod
    def full(shape, fill_value, *, dtype=None, device=None):
        if dtype is None:
            dtype = (tf.bool if isinstance(fill_value, bool) else tf.int64 if isinstance(fill_value, int)
                     else tf.complex64 if isinstance(fill_value, complex) else tf.float32)
        with _dev(device):
            return tf.fill(shape, tf.cast(fill_value, dtype))

    @staticmethod
    def eye(n_rows, n_cols=None, *, k=0, dtype=None, device=None):
        n_cols = n_rows if n_cols is None else n_cols
        with _dev(device):
            i = tf.range(n_rows)[:, None]
            j = tf.range(n_cols)[None, :]
            return tf.cast(j - i == k, dtype or tf.float32)

    @staticmethod
    def linspace(start, stop, num, *, dtype=None, device=None, endpoint=True):
        with _dev(device):
            div = (num - 1) if endpoint else num
            step = (stop - start) / div if div > 0 else 0.0
            out = start + tf.range(num, dtype=tf.float64) * step
            if endpoint and num > 1:
                out = tf.concat([out[:-1], tf.constant([stop], tf.float64)], 0)
            return tf.cast(out, dtype or tf.float32)

    @staticmethod
    def zeros_like(x, *, dtype=None, device=None):
        return tf.zeros_like(x, dtype=dtype)

    @staticmethod
    def ones_like(x, *, dtype=None, device=None):
        return tf.ones_like(x, dtype=dtype)

    empty_like = zeros_like

    @staticmethod
    def full_like(x, fill_value, *, dtype=None, device=None):
        return tf.fill(tf.shape(x), tf.cast(fill_value, dtype or x.dtype))

    @staticmethod
    def _band(x, k, lower):
        n, m = x.shape[-2], x.shape[-1]
        d = tf.range(m)[None, :] - tf.range(n)[:, None]
        keep = d <= k if lower else d >= k
        return tf.where(keep, x, tf.zeros_like(x))

    @staticmethod
    def tril(x, *, k=0):
        return _Namespace._band(x, k, True)

    @staticmethod
    def triu(x, *, k=0):
        return _Namespace._band(x, k, False)

    @staticmethod
    def meshgrid(*arrays, indexing="xy"):
        return tf.meshgrid(*arrays, indexing=indexing)

    # ----- data types ------------------------------------------------------------------------------------
    @staticmethod
    def astype(x, dtype, /, *, copy=True, device=None):
        return tf.cast(x, dtype)

    @staticmethod
    def isdtype(dtype, kind):
        dtype = tf.as_dtype(dtype)
        if isinstance(kind, tuple):
            return any(_Namespace.isdtype(dtype, k) for k in kind)
        if not isinstance(kind, str):
            return dtype == tf.as_dtype(kind)
        return {"bool": dtype == tf.bool, "signed integer": dtype.is_integer and not dtype.is_unsigned,
                "unsigned integer": dtype.is_integer and dtype.is_unsigned, "integral": dtype.is_integer,
                "real floating": dtype.is_floating, "complex floating": dtype.is_complex,
                "numeric": dtype.is_integer or dtype.is_floating or dtype.is_complex}[kind]

    @staticmethod
    def finfo(dtype):
        return np.finfo(tf.as_dtype(getattr(dtype, "dtype", dtype)).as_numpy_dtype)

    @staticmethod
    def iinfo(dtype):
        return np.iinfo(tf.as_dtype(getattr(dtype, "dtype", dtype)).as_numpy_dtype)

    @staticmethod
    def result_type(*args):
        return tf.as_dtype(np.result_type(*[tf.as_dtype(getattr(a, "dtype", a)).as_numpy_dtype
                                            if not isinstance(a, bool | int | float | complex) else a
                                            for a in args]))

    # ----- element-wise ----------------------------------------------------------------------------------
    abs = _unary("abs", tf.abs)
    acos, acosh = _unary("acos", tf.math.acos), _unary("acosh", tf.math.acosh)
    asin, asinh = _unary("asin", tf.math.asin), _unary("asinh", tf.math.asinh)
    atan, atanh = _unary("atan", tf.math.atan), _unary("atanh", tf.math.atanh)
    cos, cosh = _unary("cos", tf.cos), _unary("cosh", tf.cosh)
    sin, sinh = _unary("sin", tf.sin), _unary("sinh", tf.sinh)
    tan, tanh = _unary("tan", tf.tan), _unary("tanh", tf.tanh)
    exp, expm1 = _unary("exp", tf.exp), _unary("expm1", tf.math.expm1)
    log, log1p = _unary("log", tf.math.log), _unary("log1p", tf.math.log1p)
    log2 = _unary("log2", lambda x: tf.math.log(x) * (1.0 / _LN2))
    log10 = _unary("log10", lambda x: tf.math.log(x) * (1.0 / _LN10))
    sqrt, square = _unary("sqrt", tf.sqrt), _unary("square", tf.square)
    negative, positive = _unary("negative", tf.negative), _unary("positive", lambda x: x)
    reciprocal = _unary("reciprocal", lambda x: 1.0 / x)
    sign = _unary("sign", tf.sign)
    ceil = _unary("ceil", tf.math.ceil, ints=lambda x: x)
    floor = _unary("floor", tf.math.floor, ints=lambda x: x)
    round = _unary("round", tf.math.round, ints=lambda x: x)  # halves to even, as NumPy
    trunc = _unary("trunc", _trunc, ints=lambda x: x)
    isfinite = _unary("isfinite", tf.math.is_finite, ints=lambda x: tf.ones_like(x, tf.bool))
    isinf = _unary("isinf", tf.math.is_inf, ints=lambda x: tf.zeros_like(x, tf.bool))
    isnan = _unary("isnan", tf.math.is_nan, ints=lambda x: tf.zeros_like(x, tf.bool))
    signbit = _unary("signbit", _signbit)
    logical_not = _unary("logical_not", lambda x: tf.logical_not(tf.cast(x, tf.bool)))
    bitwise_invert = _unary("bitwise_invert", tf.bitwise.invert, ints=_invert)
    conj = _unary("conj", tf.math.conj)
    real = _unary("real", tf.math.real)
    imag = _unary("imag", tf.math.imag)

    add = _binary("add", tf.add)
    subtract = _binary("subtract", tf.subtract)
    multiply = _binary("multiply", tf.multiply)
    divide = _binary("divide", lambda a, b: a / b)
    floor_divide = _binary("floor_divide", tf.math.floordiv)
    remainder = _binary("remainder", tf.math.floormod)  # the sign of x2, as Python's %
    pow = _binary("pow", tf.pow)
    equal, not_equal = _binary("equal", tf.equal), _binary("not_equal", tf.not_equal)
    less, less_equal = _binary("less", tf.less), _binary("less_equal", tf.less_equal)
    greater, greater_equal = _binary("greater", tf.greater), _binary("greater_equal", tf.greater_equal)
    atan2 = _binary("atan2", tf.math.atan2)
    copysign = _binary("copysign", _copysign)
    hypot = _binary("hypot", _hypot)
    logaddexp = _binary("logaddexp", _logaddexp)
    maximum, minimum = _binary("maximum", tf.maximum), _binary("minimum", tf.minimum)
    logical_and = _binary("logical_and", lambda a, b: tf.logical_and(tf.cast(a, tf.bool), tf.cast(b, tf.bool)))
    logical_or = _binary("logical_or", lambda a, b: tf.logical_or(tf.cast(a, tf.bool), tf.cast(b, tf.bool)))
    logical_xor = _binary("logical_xor", lambda a, b: tf.math.logical_xor(tf.cast(a, tf.bool),
                                                                           tf.cast(b, tf.bool)))
    bitwise_and = _binary("bitwise_and", _bitwise(tf.bitwise.bitwise_and, tf.logical_and))
    bitwise_or = _binary("bitwise_or", _bitwise(tf.bitwise.bitwise_or, tf.logical_or))
    bitwise_xor = _binary("bitwise_xor", _bitwise(tf.bitwise.bitwise_xor, tf.math.logical_xor))
    bitwise_left_shift = _binary("bitwise_left_shift", tf.bitwise.left_shift)
    bitwise_right_shift = _binary("bitwise_right_shift", tf.bitwise.right_shift)

    @staticmethod
    def clip(x, /, min=None, max=None):
        if min is not None:
            x = tf.maximum(x, _tensor(min, x))
        if max is not None:
            x = tf.minimum(x, _tensor(max, x))
        return x

    @staticmethod
    def where(cond, x1, x2):
        x1, x2 = _pair(x1, x2)
        cond = cond if cond.dtype == tf.bool else tf.cast(cond, tf.bool)
        return tf.where(cond, x1, x2)

    # ----- indexing --------------------------------------------------------------------------------------
    @staticmethod
    def take(x, indices, /, *, axis=None):
        if axis is None:
            return tf.gather(tf.reshape(x, (-1,)), indices)
        return tf.gather(x, indices, axis=axis)

    @staticmethod
    def take_along_axis(x, indices, /, *, axis=-1):
        nd = len(x.shape)
        axis %= nd
        perm = [*(a for a in range(nd) if a != axis), axis]  # the axis last, then one batched gather
        back = [*range(axis), nd - 1, *range(axis, nd - 1)]
        xt, it = tf.transpose(x, perm), tf.transpose(indices, perm)
        shape = tf.concat([tf.shape(it)[:-1], tf.shape(xt)[-1:]], 0)
        out = tf.gather(tf.broadcast_to(xt, shape), it, batch_dims=nd - 1)
        return tf.transpose(out, back)

    # ----- linear algebra --------------------------------------------------------------------------------
    @staticmethod
    def matmul(x1, x2):
        if len(x1.shape) >= 2 and len(x2.shape) >= 2:
            return tf.matmul(x1, x2)
        return tnp.matmul(x1, x2)  # vectors as NumPy: a 1-d operand gains an axis that the result drops

    @staticmethod
    def matrix_transpose(x):
        return tf.linalg.matrix_transpose(x)

    @staticmethod
    def tensordot(x1, x2, /, *, axes=2):
        return tf.tensordot(x1, x2, axes)

    @staticmethod
    def vecdot(x1, x2, /, *, axis=-1):
        x1, x2 = _pair(x1, x2)
        return tf.reduce_sum(tf.math.conj(x1) * x2, axis)

    einsum = staticmethod(tf.einsum)

    # ----- manipulation ----------------------------------------------------------------------------------
    @staticmethod
    def broadcast_arrays(*arrays):
        shape = tf.shape(arrays[0])
        for a in arrays[1:]:
            shape = tf.broadcast_dynamic_shape(shape, tf.shape(a))
        return [tf.broadcast_to(a, shape) for a in arrays]

    @staticmethod
    def broadcast_to(x, shape):
        return tf.broadcast_to(x, shape)

    @staticmethod
    def concat(arrays, /, *, axis=0):
        arrays = list(arrays)
        if axis is None:
            return tf.concat([tf.reshape(a, (-1,)) for a in arrays], 0)
        return tf.concat(arrays, axis)

    @staticmethod
    def stack(arrays, /, *, axis=0):
        return tf.stack(list(arrays), axis)

    @staticmethod
    def unstack(x, /, *, axis=0):
        return tuple(tf.unstack(x, axis=axis))

    @staticmethod
    def expand_dims(x, /, *, axis=0):
        return tf.expand_dims(x, axis)

    @staticmethod
    def squeeze(x, /, axis):
        return tf.squeeze(x, _axes(axis) if isinstance(axis, tuple | list) else [axis])

    @staticmethod
    def flip(x, /, *, axis=None):
        if axis is None:
            axis = list(range(len(x.shape)))
        return tf.reverse(x, _axes(axis) if isinstance(axis, tuple | list) else [axis])

    @staticmethod
    def roll(x, /, shift, *, axis=None):
        if axis is None:
            return tf.reshape(tf.roll(tf.reshape(x, (-1,)), shift, 0), tf.shape(x))
        return tf.roll(x, shift, axis)

    @staticmethod
    def permute_dims(x, /, axes):
        return tf.transpose(x, axes)

    @staticmethod
    def moveaxis(x, source, destination, /):
        nd = len(x.shape)
        src = [s % nd for s in (source if isinstance(source, tuple | list) else [source])]
        dst = [d % nd for d in (destination if isinstance(destination, tuple | list) else [destination])]
        rest = [a for a in range(nd) if a not in src]
        perm = [None] * nd
        for s, d in zip(src, dst):
            perm[d] = s
        it = iter(rest)
        return tf.transpose(x, [p if p is not None else next(it) for p in perm])

    @staticmethod
    def reshape(x, /, shape, *, copy=None):
        if isinstance(shape, tuple | list) and any(d is None for d in shape):  # sizes read from a traced tensor's
            # static shape (an axis unknown while tracing)
            shape = _known(x, shape)
        return tf.reshape(x, shape)

    @staticmethod
    def repeat(x, repeats, /, *, axis=None):
        if axis is None:
            x, axis = tf.reshape(x, (-1,)), 0
        return tf.repeat(x, repeats, axis=axis)

    @staticmethod
    def tile(x, repetitions, /):
        reps = list(repetitions)
        nd = len(x.shape)
        if len(reps) > nd:
            x = tf.reshape(x, [1] * (len(reps) - nd) + list(x.shape))
        reps = [1] * (len(x.shape) - len(reps)) + reps
        return tf.tile(x, reps)

    # ----- searching -------------------------------------------------------------------------------------
    @staticmethod
    def _arg(fn, x, axis, keepdims):
        if axis is None:
            out = fn(tf.reshape(x, (-1,)), 0)
            return tf.reshape(out, [1] * len(x.shape)) if keepdims else out
        out = fn(x, axis)  # the first index on ties, as NumPy
        return tf.expand_dims(out, axis) if keepdims else out

    @staticmethod
    def argmax(x, /, *, axis=None, keepdims=False):
        return _Namespace._arg(tf.argmax, x, axis, keepdims)

    @staticmethod
    def argmin(x, /, *, axis=None, keepdims=False):
        return _Namespace._arg(tf.argmin, x, axis, keepdims)

    @staticmethod
    def count_nonzero(x, /, *, axis=None, keepdims=False):
        return tf.math.count_nonzero(x, _axes(axis), keepdims, dtype=tf.int64)

    @staticmethod
    def nonzero(x, /):
        idx = tf.where(tf.cast(x, tf.bool))
        return tuple(idx[:, i] for i in range(len(x.shape)))

    @staticmethod
    def searchsorted(x1, x2, /, *, side="left", sorter=None):
        if sorter is not None:
            x1 = tf.gather(x1, sorter)
        return tf.reshape(tf.searchsorted(x1, tf.reshape(x2, (-1,)), side=side, out_type=tf.int64), tf.shape(x2))

    # ----- sets ------------------------------------------------------------------------------------------
    @staticmethod
    def unique_all(x, /):
        flat = tf.reshape(x, (-1,))
        seen, first_idx = tf.unique(flat, out_idx=tf.int64)  # in order of first appearance
        order = tf.argsort(seen, stable=True)
        values = tf.gather(seen, order)
        rank = tf.math.invert_permutation(order)
        inverse = tf.gather(rank, first_idx)
        n = tf.shape(values, tf.int64)[0]
        counts = tf.math.unsorted_segment_sum(tf.ones_like(inverse), inverse, n)
        indices = tf.math.unsorted_segment_min(tf.range(tf.size(flat, tf.int64), dtype=tf.int64), inverse, n)
        return values, indices, tf.reshape(inverse, tf.shape(x)), counts

    @staticmethod
    def unique_counts(x, /):
        values, _, _, counts = _Namespace.unique_all(x)
        return values, counts

    @staticmethod
    def unique_inverse(x, /):
        values, _, inverse, _ = _Namespace.unique_all(x)
        return values, inverse

    @staticmethod
    def unique_values(x, /):
        return _Namespace.unique_all(x)[0]

    # ----- sorting ---------------------------------------------------------------------------------------
    @staticmethod
    def argsort(x, /, *, axis=-1, descending=False, stable=True):
        # top_k underneath: the lower index first on ties in both directions, as a stable sort
        return tf.argsort(x, axis, "DESCENDING" if descending else "ASCENDING", stable=True)

    @staticmethod
    def sort(x, /, *, axis=-1, descending=False, stable=True):
        idx = _Namespace.argsort(x, axis=axis, descending=descending)
        return _Namespace.take_along_axis(x, idx, axis=axis)  # a gather: differentiable

    # ----- statistics ------------------------------------------------------------------------------------
    @staticmethod
    def sum(x, /, *, axis=None, dtype=None, keepdims=False):
        if dtype is not None or x.dtype == tf.bool:
            x = tf.cast(x, dtype or tf.int64)
        return tf.reduce_sum(x, _axes(axis), keepdims)

    @staticmethod
    def prod(x, /, *, axis=None, dtype=None, keepdims=False):
        if dtype is not None or x.dtype == tf.bool:
            x = tf.cast(x, dtype or tf.int64)
        return tf.reduce_prod(x, _axes(axis), keepdims)

    @staticmethod
    def mean(x, /, *, axis=None, keepdims=False):
        return tf.reduce_mean(x, _axes(axis), keepdims)

    @staticmethod
    def max(x, /, *, axis=None, keepdims=False):
        return tf.reduce_max(x, _axes(axis), keepdims)

    @staticmethod
    def min(x, /, *, axis=None, keepdims=False):
        return tf.reduce_min(x, _axes(axis), keepdims)

    @staticmethod
    def var(x, /, *, axis=None, correction=0.0, keepdims=False):
        axis = _axes(axis)
        d = x - tf.reduce_mean(x, axis, keepdims=True)
        n = tf.cast(_count(x, axis), x.dtype)
        return tf.reduce_sum(tf.square(d), axis, keepdims) / (n - correction)

    @staticmethod
    def std(x, /, *, axis=None, correction=0.0, keepdims=False):
        return tf.sqrt(_Namespace.var(x, axis=axis, correction=correction, keepdims=keepdims))

    @staticmethod
    def _cumulative(fn, start, x, axis, dtype, include_initial):
        if axis is None:
            if len(x.shape) != 1:
                raise ValueError(f"cumulative_sum/prod: axis=None needs a 1-d array, got shape {tuple(x.shape)}; "
                                 "give the axis")
            axis = 0
        if dtype is not None:
            x = tf.cast(x, dtype)
        out = fn(x, axis)
        if include_initial:
            axis %= len(x.shape)
            shape = tf.tensor_scatter_nd_update(tf.shape(out), [[axis]], [1])
            out = tf.concat([tf.fill(shape, tf.cast(start, out.dtype)), out], axis)
        return out

    @staticmethod
    def cumulative_sum(x, /, *, axis=None, dtype=None, include_initial=False):
        return _Namespace._cumulative(tf.cumsum, 0, x, axis, dtype, include_initial)

    @staticmethod
    def cumulative_prod(x, /, *, axis=None, dtype=None, include_initial=False):
        return _Namespace._cumulative(tf.math.cumprod, 1, x, axis, dtype, include_initial)

    # ----- utilities -------------------------------------------------------------------------------------
    @staticmethod
    def all(x, /, *, axis=None, keepdims=False):
        return tf.reduce_all(tf.cast(x, tf.bool), _axes(axis), keepdims)

    @staticmethod
    def any(x, /, *, axis=None, keepdims=False):
        return tf.reduce_any(tf.cast(x, tf.bool), _axes(axis), keepdims)

    @staticmethod
    def diff(x, /, *, axis=-1, n=1, prepend=None, append=None):
        parts = [p for p in (prepend, x, append) if p is not None]
        if len(parts) > 1:
            x = tf.concat(parts, axis)
        nd = len(x.shape)
        axis %= nd
        lead = (slice(None),) * axis
        for _ in range(n):
            x = x[(*lead, slice(1, None))] - x[(*lead, slice(None, -1))]
        return x


class TensorflowBackend(Backend):
    name = "tensorflow"
    array_name = "tf.Tensor"
    has_autodiff = True

    def __init__(self):
        super().__init__()
        _add_numpy_methods()
        self.xp = _Namespace()
        self.native_types.update({_EagerTensor, tf.Variable, type(tf.Variable(0.0))})

    # ----- arrays ------------------------------------------------------------------------------------
    def is_native(self, x) -> bool:
        return isinstance(x, tf.Tensor | tf.Variable)  # eager, symbolic (tf.function) and variables

    def dtype(self, name):
        try:
            return tf.as_dtype(name)
        except TypeError as e:
            raise BackendError(f"the tensorflow backend has no dtype {name!r}") from e

    def dtype_name(self, x):
        return x.dtype.name

    def is_traced(self, x):
        return isinstance(x, tf.Tensor) and not isinstance(x, _EagerTensor)

    def from_numpy(self, a, device=None, copy=True):
        with tf.device(_tf_device(self.check_device(device) if device else "cpu")):
            return tf.constant(np.asarray(a))

    def to_numpy(self, x):
        return np.asarray(x.numpy())

    def _from_dlpack(self, x):
        # Not tf.experimental.dlpack: a tensor made that way aliases the other library's buffer, which need not
        # be 64-byte aligned, and TensorFlow's CPU kernels then abort the process ("Check failed: IsAligned()",
        # seen in a transpose after a move from numpy). tf.constant copies into aligned memory when it must.
        x = x.detach().cpu() if hasattr(x, "detach") else x
        return tf.constant(np.array(np.from_dlpack(x), copy=True))

    def make_parameter(self, value, trainable, order="C"):
        if isinstance(value, tf.Variable) and value.trainable == bool(trainable):
            return value
        return tf.Variable(value, trainable=bool(trainable) and (value.dtype.is_floating or value.dtype.is_complex))

    def set_trainable(self, value, flag):
        if isinstance(value, tf.Variable):  # read-only in the public API; tape and tf.Module read it
            value._trainable = bool(flag) and value.dtype.is_floating

    def assign(self, old, new):
        if (isinstance(old, tf.Variable) and old.shape == new.shape and old.dtype == new.dtype
                and old.device == getattr(new, "device", old.device)):
            old.assign(new)
            return old
        return new

    def copy(self, x):
        return tf.identity(x)

    # ----- devices -----------------------------------------------------------------------------------
    def devices(self):
        return ["cpu"] + [f"cuda:{i}" for i, _ in enumerate(tf.config.list_logical_devices("GPU"))]

    def default_device(self):
        return "cpu"

    def device_of(self, x):
        d = getattr(x, "device", "") or ""
        if not d:
            return self.default_device()  # a symbolic tensor has no device yet
        kind, idx = d.split(":")[-2:]
        return normalise_device(f"{kind.rpartition('/')[2].lower()}:{idx}")

    def to_device(self, x, device):
        if device is None:
            return x
        device = self.check_device(device)
        if self.device_of(x) == device:
            return x
        with tf.device(_tf_device(device)):
            return tf.identity(x)

    # ----- autodiff ----------------------------------------------------------------------------------
    def value_and_grad(self, f, params, has_aux=False):
        paths = [p for p, v in params.items() if not isinstance(v, tf.Variable) or v.trainable]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch([params[p] for p in paths])
            out = f(params)
            loss = out[0] if has_aux else out
        grads = tape.gradient(loss, [params[p] for p in paths], unconnected_gradients=tf.UnconnectedGradients.ZERO)
        grads = {p: tf.convert_to_tensor(g) for p, g in zip(paths, grads)}  # IndexedSlices -> dense
        loss = tf.stop_gradient(loss)
        return ((loss, out[1]) if has_aux else loss), grads

    # ----- native ops --------------------------------------------------------------------------------
    relu = staticmethod(tf.nn.relu)
    tanh = staticmethod(tf.tanh)
    sigmoid = staticmethod(tf.sigmoid)

    def leaky_relu(self, x, negative_slope=0.01):
        return tf.nn.leaky_relu(x, negative_slope)

    def gelu(self, x, approximate=False):
        return tf.nn.gelu(x, approximate=approximate)

    def softmax(self, x, axis=-1):
        return tf.nn.softmax(x, axis)

    def log_softmax(self, x, axis=-1):
        return tf.nn.log_softmax(x, axis)

    def logsumexp(self, x, axis=-1, keepdims=False):
        return tf.reduce_logsumexp(x, axis, keepdims)

    einsum = staticmethod(tf.einsum)

    @staticmethod
    def linear(x, weight, bias=None):
        # matmul broadcasts leading axes of x against the (in, out) weight; a single vector (in,) as torch's
        if x.shape.rank == 1:
            y = tf.tensordot(x, weight, 1)
            return y if bias is None else y + bias
        y = tf.matmul(x, weight)
        return y if bias is None else tf.nn.bias_add(y, bias)

    def rfft(self, x):
        return tf.signal.rfft(x)

    def conv(self, x, w, b, stride, padding, dilation, groups):
        # TensorFlow's CPU kernels take channels last only: move the channels, convolve, move them back
        nd = len(stride)
        last = (0, *range(2, 2 + nd), 1)
        x = tf.transpose(x, last)
        if any(lo or hi for lo, hi in padding):
            x = tf.pad(x, [(0, 0), *padding, (0, 0)])
        w = tf.transpose(w, (*range(2, 2 + nd), 1, 0))  # (O, C/g, *k) -> (*k, C/g, O)
        step = stride
        if any(s > 1 for s in stride) and any(d > 1 for d in dilation):
            step = (1,) * nd  # TensorFlow refuses strides together with dilations: stride by slicing after
        if groups == 1:
            y = tf.nn.convolution(x, w, step, "VALID", dilations=dilation)
        else:  # grouped convolution has no CPU kernel: one convolution per group
            xs, ws = tf.split(x, groups, axis=-1), tf.split(w, groups, axis=-1)
            y = tf.concat([tf.nn.convolution(a, k, step, "VALID", dilations=dilation) for a, k in zip(xs, ws)], -1)
        if step != stride:
            y = y[(slice(None), *(slice(None, None, s) for s in stride))]
        if 0 in tuple(y.shape)[1:-1]:  # TensorFlow gives an empty output where torch raises (ops.conv explains it)
            raise ValueError(f"conv: the output of input {tuple(x.shape)} and kernel {tuple(w.shape)} is empty")
        if b is not None:
            y = tf.nn.bias_add(y, b)
        return tf.transpose(y, (0, nd + 1, *range(1, nd + 1)))

    def pool(self, x, kind, window, stride, padding):
        if not x.dtype.is_floating or any(s + lo + hi < w for s, w, (lo, hi) in zip(x.shape[2:], window, padding)):
            raise ValueError("pool: floating-point input at least as large as the window")  # ops.pool explains
        nd = len(window)
        x = tf.transpose(x, (0, *range(2, 2 + nd), 1))
        if any(lo or hi for lo, hi in padding):
            x = tf.pad(x, [(0, 0), *padding, (0, 0)], constant_values=-math.inf if kind == "max" else 0.0)
        y = tf.nn.pool(x, window, "MAX" if kind == "max" else "AVG", strides=stride, padding="VALID")
        return tf.transpose(y, (0, nd + 1, *range(1, nd + 1)))

    def layer_norm(self, x, weight, bias, eps):
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        y = (x - mean) * tf.math.rsqrt(var + eps)
        y = y if weight is None else y * weight
        return y if bias is None else y + bias

    def rms_norm(self, x, weight, eps):
        y = x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + eps)
        return y if weight is None else y * weight

    def embedding(self, weight, indices):
        return tf.gather(weight, indices)  # out-of-range indices are an error on CPU, as on torch

    def is_integral(self, x):
        return x.dtype.is_integer

    def value_range(self, x):
        if self.is_traced(x) or x.shape.num_elements() == 0:
            return None
        return tf.reduce_min(x).numpy().item(), tf.reduce_max(x).numpy().item()

    def cross_entropy(self, logits, labels):
        if labels.dtype.is_integer:
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels, logits))

    def binary_cross_entropy_with_logits(self, logits, targets):
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(targets, logits))

    def mse(self, pred, target):
        return tf.reduce_mean(tf.square(pred - target))

    def attention(self, q, k, v, mask):
        scores = tf.einsum("nlhd,nshd->nhls", q, k) * (1.0 / math.sqrt(q.shape[-1]))
        if mask is not None:
            scores = tf.where(mask, scores, tf.constant(-math.inf, scores.dtype))
        return tf.einsum("nhls,nshd->nlhd", tf.nn.softmax(scores, -1), v)

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum, eps):
        nd = len(x.shape)
        axes = [i for i in range(nd) if i != 1]
        shape = (1, -1) + (1,) * (nd - 2)
        if training:
            mean, var = tf.nn.moments(x, axes)
            n = tf.cast(tf.size(x) // tf.shape(x)[1], x.dtype)
            m, v = tf.stop_gradient(mean), tf.stop_gradient(var)
            running_mean = running_mean * (1 - momentum) + m * momentum
            running_var = running_var * (1 - momentum) + v * (momentum * n / tf.maximum(n - 1, 1))
        else:
            mean, var = tf.convert_to_tensor(running_mean), tf.convert_to_tensor(running_var)
        y = (x - tf.reshape(mean, shape)) * tf.math.rsqrt(tf.reshape(var, shape) + eps)
        if weight is not None:
            y = y * tf.reshape(weight, shape)
        if bias is not None:
            y = y + tf.reshape(bias, shape)
        return y, running_mean, running_var

    def scan(self, fn, carry, xs):
        """A ``tf.while_loop`` over the leading axis: one loop node under ``tf.function``, whatever the
        length (a Python loop would unroll it).

        The outputs are written into a ``TensorArray`` made from a zero tensor (``unstack``), not reserved
        empty: TFLite lowers a reserved list only when its elements' shape is static, and with a batch of
        any size (``lm.export(..., input_shape=(None, T, F))``) it is not."""
        length = xs.shape[0]  # static where known, so the stacked outputs keep a static time axis
        n = length if length is not None else tf.shape(xs)[0]
        carry, y0 = fn(carry, xs[0])
        flat = tf.nest.flatten(y0)
        arrays = [tf.TensorArray(y.dtype, size=n, element_shape=y.shape).unstack(
            tf.zeros(tf.concat([[n], tf.shape(y)], 0), y.dtype)).write(0, y) for y in flat]

        def body(i, c, arrays):
            c, y = fn(c, xs[i])
            return i + 1, c, [a.write(i, t) for a, t in zip(arrays, tf.nest.flatten(y))]

        _, carry, arrays = tf.while_loop(lambda i, c, a: i < n, body, (tf.constant(1), carry, arrays))
        ys = [a.stack() for a in arrays]
        if length is not None:
            for y in ys:
                y.set_shape([length, *y.shape[1:]])
        return carry, tf.nest.pack_sequence_as(y0, ys)

    def stop_gradient(self, x):
        return tf.stop_gradient(x)

    def fold_key(self, key, i):
        if isinstance(key, int | np.integer):
            return super().fold_key(int(key), i)
        return tf.random.experimental.stateless_fold_in(key, i)

    def dropout(self, x, rate, training=True, key=None):
        if not training or rate == 0.0:
            return x
        if rate >= 1.0:
            return tf.zeros_like(x)
        if key is None:
            return tf.nn.dropout(x, rate)
        seed = tf.constant([int(key), 0], tf.int64) if isinstance(key, int | np.integer) else key
        keep = tf.random.stateless_uniform(tf.shape(x), seed, dtype=x.dtype) >= rate
        return tf.where(keep, x / (1.0 - rate), tf.zeros_like(x))
