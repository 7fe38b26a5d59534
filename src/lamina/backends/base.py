"""The adapter interface that every backend implements, with generic Array-API code as the default.

Only the modules in this package know which backend is which. Everything else in Lamina asks an adapter
(``backend.asarray``, ``backend.relu``, ...). A backend subclass overrides a generic method where its
native kernel is measurably faster (DESIGN.md, rule 3); everything it does not override runs through the
``array_api_compat`` namespace, resolved once per adapter rather than once per operation.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np

from ..errors import BackendError, DeviceError

# Python values that pass through a layer call untouched, next to the backend's own array types.
PASSTHROUGH_TYPES = (int, float, bool, complex, str, type(None), slice, type(Ellipsis))


class Backend:
    """One array library seen through Lamina's eyes. Subclasses: numpy, torch, jax."""

    name = "?"
    #: human name of the array type, used in error messages ("torch.Tensor")
    array_name = "?"
    has_autodiff = False
    #: True where the native embedding kernel refuses out-of-range (and negative) indices by itself, so that
    #: lm.ops need not read the indices back to check them (a device sync per call)
    kernels_check_indices = False

    def __init__(self):
        self.native_types: set[type] = set(PASSTHROUGH_TYPES)

    # ----- arrays ------------------------------------------------------------------------------------
    def is_native(self, x) -> bool:
        """True when ``x`` is an array of this backend (including tracers and subclasses)."""
        raise NotImplementedError

    def dtype(self, name: str):
        """The backend's dtype object for a dtype name such as ``"float32"``."""
        raise NotImplementedError

    def is_traced(self, x) -> bool:
        """True for a value that exists only while a function is being traced (a jax tracer)."""
        return False

    def canonical_dtype(self, name: str) -> str:
        """The dtype an array declared as ``name`` actually gets on this backend."""
        return name

    def dtype_name(self, x) -> str:
        """The dtype name of an array of this backend."""
        return str(x.dtype).removeprefix("torch.")

    def from_numpy(self, a: np.ndarray, device: str | None = None, copy: bool = True):
        """A backend array with the values of the NumPy array ``a``; ``copy=False`` lets it share ``a``'s
        memory where the backend can (the caller promises nobody else writes to ``a``)."""
        raise NotImplementedError

    def to_numpy(self, x) -> np.ndarray:
        """The values of ``x`` as a NumPy array on the host."""
        return np.asarray(x)

    def from_other(self, x, device: str | None = None):
        """Convert an array of another backend, zero-copy through DLPack where both sides allow it."""
        try:
            return self.to_device(self._from_dlpack(x), device)
        except Exception:  # DLPack refused (other device, odd dtype, old library): copy through host
            return self.from_numpy(np.array(x.detach().cpu() if hasattr(x, "detach") else x), device)

    def _from_dlpack(self, x):
        raise NotImplementedError

    def checks_values(self, dtype: str) -> bool:
        """True when ``from_numpy`` may refuse some values of this dtype (see the jax adapter), so that a load
        converts them before it writes anything."""
        return False

    def make_parameter(self, value, trainable: bool, order: str = "C"):
        """The array to hand to ``forward`` for a parameter (a ``torch.nn.Parameter`` on torch); ``order``: the
        parameter's memory order (``"F"``: a column-major matrix), for backends with strided arrays."""
        return value

    def host_view(self, x) -> np.ndarray | None:
        """A writable NumPy view of ``x``'s own memory, or None where there is none (immutable arrays,
        another device). Checkpoint loading reads file bytes straight into it."""
        return None

    def mark_written(self, x) -> None:
        """Say that ``x``'s memory was just written through ``host_view`` (torch bumps the tensor's version
        counter, so autograd refuses a backward pass through a graph that saw the old values)."""

    def set_trainable(self, value, flag: bool) -> None:
        """Switch gradient tracking of a parameter's value on or off (only torch tracks it on arrays)."""

    def assign(self, old, new):
        """Store ``new`` as a parameter's value. Returns the array to keep: ``old`` written in place where
        the backend has mutable arrays and the shapes and dtypes agree (so optimizers and other holders of
        ``old`` see the change, as with ``torch.nn.Module.load_state_dict``), else ``new``."""
        return new

    def copy(self, x):
        return self.xp.asarray(x, copy=True)

    def no_grad(self):
        return nullcontext()

    # ----- devices -----------------------------------------------------------------------------------
    def devices(self) -> list[str]:
        return ["cpu"]

    def default_device(self) -> str:
        return "cpu"

    def device_of(self, x) -> str:
        return "cpu"

    def to_device(self, x, device: str | None):
        if device is None or device == "cpu":
            return x
        raise DeviceError(f"the {self.name} backend has no device {device!r}; it has {self.devices()}")

    def check_device(self, device: str) -> str:
        """Normalise a device name and check that the backend has it."""
        device = normalise_device(device)
        if device not in self.devices():
            raise DeviceError(f"the {self.name} backend has no device {device!r}; available: {self.devices()}")
        return device

    # ----- autodiff ----------------------------------------------------------------------------------
    def value_and_grad(self, f, params: dict, has_aux: bool = False):
        raise BackendError(
            f"the {self.name} backend has no automatic differentiation, so it cannot compute gradients; "
            "train on torch or jax (lm.set_backend('torch') or model.to(backend='jax')) and load the "
            "weights here for inference"
        )

    def jit(self, f, static_argnums: tuple = ()):
        """``f`` compiled for repeated calls (one program per signature of its array arguments; the
        arguments at ``static_argnums`` are hashed into the signature), or None where this backend does not
        compile ``lm.value_and_grad`` (its eager autodiff is what it runs)."""
        return None

    def is_trace_error(self, exc: BaseException) -> bool:
        """True when ``exc`` (or an exception it was raised from) says that a function being compiled read
        the value of a traced array (``float(x)``, ``np.asarray(x)``, ``if x > 0:``)."""
        return False

    # ----- ops: generic Array-API versions; backends override the hot ones --------------------------
    def relu(self, x):
        return self.xp.where(x > 0, x, self.xp.zeros_like(x))

    def leaky_relu(self, x, negative_slope: float = 0.01):
        return self.xp.where(x > 0, x, x * negative_slope)

    def sigmoid(self, x):
        return 1.0 / (1.0 + self.xp.exp(-x))

    def tanh(self, x):
        return self.xp.tanh(x)

    def gelu(self, x, approximate: bool = False):
        xp = self.xp
        if approximate:
            return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
        return 0.5 * x * (1.0 + _erf(xp, x / math.sqrt(2.0)))

    def logsumexp(self, x, axis=-1, keepdims: bool = False):
        xp = self.xp
        m = xp.max(x, axis=axis, keepdims=True)
        m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
        out = xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True)) + m
        return out if keepdims else xp.squeeze(out, axis=axis)

    def log_softmax(self, x, axis: int = -1):
        return x - self.logsumexp(x, axis=axis, keepdims=True)

    def softmax(self, x, axis: int = -1):
        xp = self.xp
        if x.shape[axis] == 0:  # nothing to normalise (attention over no keys): NumPy's max has no identity
            return x
        e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
        return e / xp.sum(e, axis=axis, keepdims=True)

    def einsum(self, subscripts: str, *operands):
        return self.xp.einsum(subscripts, *operands)

    def linear(self, x, weight, bias=None):
        y = x @ weight
        return y if bias is None else y + bias

    def rfft(self, x):
        return self.xp.fft.rfft(x)

    # ----- convolution and pooling (channels first: x (N, C, *spatial), w (O, C // groups, *kernel)) ------
    def conv(self, x, w, b, stride: tuple, padding: tuple, dilation: tuple, groups: int):
        """``padding``: ((low, high), ...) per spatial axis, already resolved from int / "same" / "valid"."""
        raise NotImplementedError(f"the {self.name} backend has no convolution")

    def pool(self, x, kind: str, window: tuple, stride: tuple, padding: tuple):
        """Max ("max") or average ("avg", padding counted as zeros, as torch's default) pooling."""
        raise NotImplementedError(f"the {self.name} backend has no pooling")

    def layer_norm(self, x, weight, bias, eps: float):
        xp = self.xp
        mean = xp.mean(x, axis=-1, keepdims=True)
        var = xp.mean((x - mean) ** 2, axis=-1, keepdims=True)
        y = (x - mean) / xp.sqrt(var + eps)
        y = y if weight is None else y * weight
        return y if bias is None else y + bias

    def rms_norm(self, x, weight, eps: float):
        xp = self.xp
        y = x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)
        return y if weight is None else y * weight

    def embedding(self, weight, indices):
        return self.xp.take(weight, self.xp.reshape(indices, (-1,)), axis=0).reshape(*indices.shape, weight.shape[-1])

    # ----- losses and metrics (means over the batch) ----------------------------------------------------
    def is_floating(self, x) -> bool:
        """True for a real floating-point array (float16, bfloat16, float32, float64)."""
        return self.dtype_name(x).startswith(("float", "bfloat"))

    def is_integral(self, x) -> bool:
        return self.xp.isdtype(x.dtype, "integral")

    def value_range(self, x) -> tuple | None:
        """``(min, max)`` of ``x`` as Python numbers, read on the host; None where the values cannot be read
        now (a tracer) or there are none. Used to check indices and labels before a kernel sees them."""
        if self.is_traced(x) or math.prod(x.shape) == 0:
            return None
        return self.xp.min(x).item(), self.xp.max(x).item()

    def cross_entropy(self, logits, labels):
        xp = self.xp
        logp = self.log_softmax(logits, -1)
        if self.is_integral(labels):
            picked = xp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
            return -xp.mean(picked)
        return -xp.mean(xp.sum(labels * logp, axis=-1))

    def binary_cross_entropy_with_logits(self, logits, targets):
        xp = self.xp  # max(x, 0) - x * y + log(1 + exp(-|x|)): stable for large |x|
        return xp.mean(xp.maximum(logits, 0.0) - logits * targets + xp.log1p(xp.exp(-xp.abs(logits))))

    def mse(self, pred, target):
        d = pred - target
        return self.xp.mean(d * d)

    def accuracy(self, scores, labels):
        xp = self.xp
        if not self.is_integral(labels):
            labels = xp.argmax(labels, axis=-1)
        return xp.mean(xp.astype(xp.argmax(scores, axis=-1) == labels, scores.dtype))

    def attention_mask(self, key_padding_mask, causal: bool, n: int, lq: int, lk: int):
        """Boolean (N, 1, Lq, Lk) mask, True where a query may attend a key; None when nothing is masked."""
        xp = self.xp
        mask = None
        if key_padding_mask is not None:  # True marks padding (torch's convention)
            mask = xp.reshape(xp.logical_not(xp.astype(key_padding_mask, xp.bool)), (n, 1, 1, lk))
        if causal:
            tri = xp.reshape(xp.arange(lq)[:, None] >= xp.arange(lk)[None, :], (1, 1, lq, lk))
            mask = tri if mask is None else xp.logical_and(mask, tri)
        return mask

    def attention(self, q, k, v, mask):
        """Scaled dot-product attention; q (N, Lq, heads, d), k and v (N, Lk, heads, d) -> (N, Lq, heads, d)."""
        xp = self.xp
        scores = self.einsum("nlhd,nshd->nhls", q, k) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = xp.where(mask, scores, xp.asarray(-xp.inf, dtype=scores.dtype))
        return self.einsum("nhls,nshd->nlhd", self.softmax(scores, -1), v)

    def fused_recurrent(self, kind: str, x, state, weights: list, num_layers: int, has_biases: bool,
                        bidirectional: bool = False):
        """A native multi-layer recurrent kernel, or None where the backend has none (then the layer runs
        its cell through ``scan``). ``kind``: rnn_tanh, rnn_relu, gru, lstm; ``weights``: per layer (and
        direction, torch's order) [w_ih, w_hh(, b_ih, b_hh)]; ``state``: h0, or (h0, c0) for lstm. Returns
        (outputs, h_n) or (outputs, (h_n, c_n))."""
        return None

    def scan(self, fn, carry, xs):
        """``fn(carry, x) -> (carry, y)`` over the leading axis of ``xs``; returns (carry, stacked ys). A
        Python loop here; jax compiles it as one ``lax.scan`` whatever the length."""
        ys = []
        for t in range(xs.shape[0]):
            carry, y = fn(carry, xs[t])
            ys.append(y)
        return carry, self.xp.stack(ys)

    def stop_gradient(self, x):
        """``x`` cut off from autodiff (no-op where there is none)."""
        return x

    def fold_key(self, key, i: int):
        """The ``i``-th key derived from ``key`` (see ``lamina.random``)."""
        return hash((key, i)) & 0x7FFFFFFF

    def batch_norm(self, x, running_mean, running_var, weight, bias, training: bool, momentum: float, eps: float):
        """Normalize over every axis but 1 (channels). Returns ``(y, new running mean, new running var)``;
        in training mode the batch statistics normalize and update the running ones (unbiased variance),
        in eval mode the running ones normalize and come back unchanged."""
        xp = self.xp
        axes = tuple(i for i in range(x.ndim) if i != 1)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if training:
            mean = xp.mean(x, axis=axes)
            var = xp.mean((x - xp.reshape(mean, shape)) ** 2, axis=axes)
            n = x.size // x.shape[1]
            m, v = self.stop_gradient(mean), self.stop_gradient(var)
            running_mean = running_mean * (1 - momentum) + m * momentum
            running_var = running_var * (1 - momentum) + v * (momentum * n / max(n - 1, 1))
        else:
            mean, var = running_mean, running_var
        y = (x - xp.reshape(mean, shape)) / xp.sqrt(xp.reshape(var, shape) + eps)
        if weight is not None:
            y = y * xp.reshape(weight, shape)
        if bias is not None:
            y = y + xp.reshape(bias, shape)
        return y, running_mean, running_var

    def dropout(self, x, rate: float, training: bool = True, key=None):
        if not training or rate == 0.0:
            return x
        if rate >= 1.0:
            return x * 0
        rng = np.random.default_rng(key)
        keep = self.from_numpy(rng.random(tuple(x.shape)) >= rate, self.device_of(x))
        return self.xp.where(keep, x / (1.0 - rate), self.xp.zeros_like(x))

    def __repr__(self) -> str:
        return f"<lamina backend {self.name!r}>"

    def __deepcopy__(self, memo):
        return self  # one adapter per backend, shared by every copy of every model


def normalise_device(device) -> str:
    """Lamina's device names: ``"cpu"``, ``"cuda:0"``, ... (``"cuda"`` means ``"cuda:0"``)."""
    device = str(device).lower()
    if device in ("cpu:0",):
        return "cpu"
    if device in ("cuda", "gpu", "gpu:0"):
        return "cuda:0"
    if device.startswith("gpu:"):
        return "cuda:" + device[4:]
    return device


def _erf(xp, x):
    # Abramowitz & Stegun 7.1.26 is only good to 1.5e-7 absolute; the Numerical Recipes erfc
    # Chebyshev fit below is good to 1.2e-7 relative, well inside float32, using only exp.
    z = xp.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    erfc = t * xp.exp(poly)
    return xp.where(x >= 0, 1.0 - erfc, erfc - 1.0)
