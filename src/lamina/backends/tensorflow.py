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


class _Namespace:
    """The Array API names Lamina's generic code uses, over ``tf.experimental.numpy`` (the rest)."""

    bool = tf.bool
    inf = math.inf
    float32, float64, int32, int64 = tf.float32, tf.float64, tf.int32, tf.int64

    def __getattr__(self, name):
        return getattr(tnp, name)

    @staticmethod
    def asarray(x, dtype=None, copy=None, device=None):
        if dtype is not None and tf.is_tensor(x):
            return tf.cast(x, dtype)
        return tf.convert_to_tensor(x, dtype=dtype)

    @staticmethod
    def astype(x, dtype, copy=True):
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
    def concat(arrays, axis=0):
        return tf.concat(list(arrays), axis)

    @staticmethod
    def stack(arrays, axis=0):
        return tf.stack(list(arrays), axis)

    @staticmethod
    def permute_dims(x, axes):
        return tf.transpose(x, axes)

    @staticmethod
    def reshape(x, shape, copy=None):
        return tf.reshape(x, shape)

    @staticmethod
    def take(x, indices, axis=None):
        if axis is None:
            return tf.gather(tf.reshape(x, (-1,)), indices)
        return tf.gather(x, indices, axis=axis)

    @staticmethod
    def take_along_axis(x, indices, axis=-1):
        return tnp.take_along_axis(x, indices, axis)

    @staticmethod
    def zeros(shape, dtype=None, device=None):
        return tf.zeros(shape, dtype or tf.float32)

    @staticmethod
    def ones(shape, dtype=None, device=None):
        return tf.ones(shape, dtype or tf.float32)

    @staticmethod
    def zeros_like(x, dtype=None, device=None):
        return tf.zeros_like(x, dtype=dtype)

    @staticmethod
    def mean(x, axis=None, keepdims=False):
        return tf.reduce_mean(x, axis, keepdims)

    @staticmethod
    def sum(x, axis=None, keepdims=False, dtype=None):
        return tf.reduce_sum(x if dtype is None else tf.cast(x, dtype), axis, keepdims)

    @staticmethod
    def max(x, axis=None, keepdims=False):
        return tf.reduce_max(x, axis, keepdims)

    @staticmethod
    def min(x, axis=None, keepdims=False):
        return tf.reduce_min(x, axis, keepdims)

    @staticmethod
    def argmax(x, axis=None, keepdims=False):
        out = tf.argmax(tf.reshape(x, (-1,)) if axis is None else x, 0 if axis is None else axis)
        return tf.expand_dims(out, axis) if keepdims and axis is not None else out

    @staticmethod
    def squeeze(x, axis):
        return tf.squeeze(x, axis)

    @staticmethod
    def where(cond, a, b):
        a = tf.convert_to_tensor(a, dtype=b.dtype if tf.is_tensor(b) and not tf.is_tensor(a) else None)
        b = tf.convert_to_tensor(b, dtype=a.dtype)
        return tf.where(cond, a, b)

    @staticmethod
    def arange(start, stop=None, step=1, dtype=None, device=None):
        return tf.range(start, stop, step, dtype=dtype or tf.int64) if stop is not None else tf.range(
            start, dtype=dtype or tf.int64)


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

    def make_parameter(self, value, trainable):
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
        y = tf.matmul(x, weight)  # broadcasts leading axes of x against the (in, out) weight
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
        if b is not None:
            y = tf.nn.bias_add(y, b)
        return tf.transpose(y, (0, nd + 1, *range(1, nd + 1)))

    def pool(self, x, kind, window, stride, padding):
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
        length (a Python loop would unroll it)."""
        n = tf.shape(xs)[0]
        carry, y0 = fn(carry, xs[0])
        flat = tf.nest.flatten(y0)
        arrays = [tf.TensorArray(y.dtype, size=n, element_shape=y.shape).write(0, y) for y in flat]

        def body(i, c, arrays):
            c, y = fn(c, xs[i])
            return i + 1, c, [a.write(i, t) for a, t in zip(arrays, tf.nest.flatten(y))]

        _, carry, arrays = tf.while_loop(lambda i, c, a: i < n, body, (tf.constant(1), carry, arrays))
        return carry, tf.nest.pack_sequence_as(y0, [a.stack() for a in arrays])

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
