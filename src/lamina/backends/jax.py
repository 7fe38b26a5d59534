"""The JAX backend. Parameters are plain ``jax.Array``s; a model runs as a pure function of its
``{path: array}`` dict (``lm.functional_call``) under ``jax.jit``, ``jax.grad`` and ``jax.vmap``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import BackendError, DeviceError
from .base import Backend, normalise_device

_ArrayImpl = type(jnp.zeros(()))  # the concrete (non-traced) array type
# what jax raises where traced code asks for a concrete value (float(x), np.asarray(x), if x > 0:, x[x > 0])
_TRACE_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                 jax.errors.TracerIntegerConversionError, jax.errors.NonConcreteBooleanIndexError,
                 jax.errors.UnexpectedTracerError)


def _jax_device_name(d) -> str:
    platform = "cuda" if d.platform == "gpu" else d.platform
    return "cpu" if platform == "cpu" and d.id == 0 else f"{platform}:{d.id}"


class JaxBackend(Backend):
    name = "jax"
    array_name = "jax.Array"
    has_autodiff = True

    def __init__(self):
        super().__init__()
        import array_api_compat

        self.xp = array_api_compat.array_namespace(jnp.zeros(()))
        self.native_types.add(_ArrayImpl)

    def is_native(self, x) -> bool:
        return isinstance(x, jax.Array)  # tracers under jit/grad/vmap are jax.Arrays too

    def dtype(self, name):
        try:
            return jnp.dtype(name)
        except TypeError as e:
            raise BackendError(f"the jax backend has no dtype {name!r}") from e

    def dtype_name(self, x):
        return str(x.dtype)

    def is_traced(self, x):
        return isinstance(x, jax.core.Tracer)

    def canonical_dtype(self, name):
        # without jax_enable_x64, 64-bit types are stored as 32-bit ones
        return str(jax.dtypes.canonicalize_dtype(jnp.dtype(name))) if name != "bfloat16" else name

    def from_numpy(self, a, device=None, copy=True):
        a = np.asarray(a)
        if a.dtype.kind in "iu" and a.dtype.itemsize == 8 and a.size and not jax.config.jax_enable_x64:
            _check_fits_32_bits(a)
        if copy and a.ctypes.data % 64 == 0 and a.flags.c_contiguous:
            # device_put on the CPU shares 64-byte-aligned host memory (all that torch allocates is), even with
            # may_alias=False (jax 0.10): the caller's later writes would show through; copy it on the host
            a = np.array(a, copy=True)
        return jax.device_put(a, self._device(device))

    def checks_values(self, dtype):
        return dtype in ("int64", "uint64") and not jax.config.jax_enable_x64

    def _from_dlpack(self, x):
        x = x.detach() if hasattr(x, "detach") else x
        if self.checks_values(str(getattr(x, "dtype", "")).removeprefix("torch.")):
            return self.from_numpy(np.asarray(x.cpu() if hasattr(x, "cpu") else x))  # refuses values that would wrap
        return jnp.from_dlpack(x)

    def copy(self, x):
        return jnp.array(x, copy=True)

    # ----- devices -----------------------------------------------------------------------------------
    def devices(self):
        return [_jax_device_name(d) for d in jax.devices()] + (
            [] if jax.default_backend() == "cpu" else [_jax_device_name(d) for d in jax.devices("cpu")])

    def default_device(self):
        return _jax_device_name(jax.devices()[0])

    def device_of(self, x):
        try:
            return _jax_device_name(next(iter(x.devices())))
        except Exception:  # a tracer has no device
            return self.default_device()

    def _device(self, device):
        if device is None:
            return None
        device = normalise_device(device)
        for d in jax.devices() + (jax.devices("cpu") if jax.default_backend() != "cpu" else []):
            if _jax_device_name(d) == device:
                return d
        raise DeviceError(f"the jax backend has no device {device!r}; available: {self.devices()}")

    def to_device(self, x, device):
        return x if device is None else jax.device_put(x, self._device(device))

    # ----- autodiff ----------------------------------------------------------------------------------
    def value_and_grad(self, f, params, has_aux=False):
        return jax.value_and_grad(f, has_aux=has_aux)(params)

    def jit(self, f, static_argnums=()):
        return jax.jit(f, static_argnums=static_argnums)

    def is_trace_error(self, exc):
        seen = set()
        while exc is not None and id(exc) not in seen:
            if isinstance(exc, _TRACE_ERRORS):
                return True
            seen.add(id(exc))
            exc = exc.__cause__ or exc.__context__
        return False

    # ----- native ops --------------------------------------------------------------------------------
    # Eager jax.nn.relu costs ~100 us (custom_jvp dispatch) against ~9 us for jnp.maximum, but
    # maximum's gradient at 0 is 0.5 where torch's and jax.nn.relu's is 0. Only traced arrays can be
    # differentiated, so concrete arrays take the fast path and tracers get jax.nn's gradient.
    def relu(self, x):
        if type(x) is _ArrayImpl:
            return jnp.maximum(x, 0)
        return jax.nn.relu(x)

    def leaky_relu(self, x, negative_slope=0.01):
        return jax.nn.leaky_relu(x, negative_slope)

    def sigmoid(self, x):
        return jax.nn.sigmoid(x)

    def tanh(self, x):
        return jnp.tanh(x)

    def gelu(self, x, approximate=False):
        return jax.nn.gelu(x, approximate=approximate)

    def softmax(self, x, axis=-1):
        return jax.nn.softmax(x, axis=axis)

    def log_softmax(self, x, axis=-1):
        return jax.nn.log_softmax(x, axis=axis)

    def logsumexp(self, x, axis=-1, keepdims=False):
        return jax.nn.logsumexp(x, axis=axis, keepdims=keepdims)

    einsum = staticmethod(jnp.einsum)

    def rfft(self, x):
        return jnp.fft.rfft(x)

    def conv(self, x, w, b, stride, padding, dilation, groups):
        nd = len(stride)
        spec = ("NCH", "OIH", "NCH") if nd == 1 else ("NCHW", "OIHW", "NCHW") if nd == 2 else (
            "NCDHW", "OIDHW", "NCDHW")
        y = jax.lax.conv_general_dilated(x, w, stride, list(padding), rhs_dilation=dilation,
                                         dimension_numbers=spec, feature_group_count=groups)
        if 0 in y.shape[2:]:  # XLA gives an empty output where torch raises: raise too (ops.conv explains it)
            raise ValueError(f"conv: the output of input {x.shape} and kernel {w.shape} is empty")
        return y if b is None else y + b.reshape(1, -1, *([1] * nd))

    def pool(self, x, kind, window, stride, padding):
        if not jnp.issubdtype(x.dtype, jnp.floating) or any(
                s + lo + hi < w for s, w, (lo, hi) in zip(x.shape[2:], window, padding)):
            raise ValueError("pool: floating-point input at least as large as the window")  # ops.pool explains
        dims, strides, pads = (1, 1, *window), (1, 1, *stride), ((0, 0), (0, 0), *padding)
        if kind == "max":
            return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, pads)
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pads) / float(np.prod(window))

    def embedding(self, weight, indices):
        # jax clamps out-of-range indices silently; NaN rows make the mistake visible instead
        # (take counts negative indices from the end: move them out of range so that they fill too)
        indices = jnp.where(indices < 0, weight.shape[0], indices)
        return jnp.take(weight, indices, axis=0, mode="fill", fill_value=jnp.nan)

    def stop_gradient(self, x):
        return jax.lax.stop_gradient(x)

    def scan(self, fn, carry, xs):
        return jax.lax.scan(fn, carry, xs)

    def attention(self, q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask)

    def fold_key(self, key, i):
        # an int seed (lm.random.key_scope takes either), or a traced integer seed (lm.value_and_grad's)
        if not isinstance(key, jax.Array) or (key.ndim == 0 and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
            key = jax.random.key(key)
        return jax.random.fold_in(key, i)

    def dropout(self, x, rate, training=True, key=None):
        if not training or rate == 0.0:
            return x
        if key is None:
            raise BackendError(
                "dropout on the jax backend needs a random key: pass key=jax.random.key(...) "
                "(jax has no hidden global random state); the Dropout layer finds its own"
            )
        if not isinstance(key, jax.Array):
            key = jax.random.key(key)
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _check_fits_32_bits(a: np.ndarray) -> None:
    """Without x64, jax stores 64-bit integers as 32-bit ones and would silently wrap values that do not fit."""
    small = np.iinfo(np.int32 if a.dtype.kind == "i" else np.uint32)
    lo, hi = a.min(), a.max()
    if lo < small.min or hi > small.max:
        raise ValueError(f"{a.dtype} values from {lo} to {hi} do not fit the {small.dtype} that jax stores them as "
                         "(jax_enable_x64 is off), and would wrap around silently; enable it with "
                         "jax.config.update('jax_enable_x64', True) before creating arrays, or use smaller values")
