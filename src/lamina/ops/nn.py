"""What the Array API standard lacks for deep learning, with a native fast path per backend.

Each function finds the backend of its first array argument (one dictionary lookup on the array's type)
and runs that backend's implementation: a native kernel where it is faster (``torch.relu``,
``jax.nn.softmax``, ...), generic Array-API code through ``array_api_compat`` otherwise. All of them
work under ``torch.autograd``, ``jax.grad`` and ``jax.jit``.

>>> import lamina as lm, numpy as np
>>> lm.ops.relu(np.array([-1.0, 2.0]))
array([0., 2.])
"""

from __future__ import annotations

from ..backends import backend_of
from ..errors import BackendError

__all__ = ["relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softmax", "log_softmax", "logsumexp", "einsum",
           "linear", "dropout", "rfft", "conv", "max_pool", "avg_pool", "layer_norm", "rms_norm", "embedding",
           "resolve_padding"]


def _backend(x):
    b = backend_of(x)
    if b is None:
        raise BackendError(f"expected an array of torch, jax or numpy, got {type(x).__name__}")
    return b


def relu(x):
    """max(x, 0) elementwise; its gradient at 0 is 0 on every backend."""
    return _backend(x).relu(x)


def leaky_relu(x, negative_slope: float = 0.01):
    """x where x > 0, else negative_slope * x."""
    return _backend(x).leaky_relu(x, negative_slope)


def sigmoid(x):
    """1 / (1 + exp(-x))."""
    return _backend(x).sigmoid(x)


def tanh(x):
    """Hyperbolic tangent, elementwise."""
    return _backend(x).tanh(x)


def gelu(x, approximate: bool = False):
    """x * Phi(x), with Phi the standard normal CDF (``approximate=True``: the tanh approximation)."""
    return _backend(x).gelu(x, approximate)


def softmax(x, axis: int = -1):
    """exp(x) / sum(exp(x)) along ``axis``, computed stably."""
    return _backend(x).softmax(x, axis)


def log_softmax(x, axis: int = -1):
    """x - logsumexp(x) along ``axis``."""
    return _backend(x).log_softmax(x, axis)


def logsumexp(x, axis: int = -1, keepdims: bool = False):
    """log(sum(exp(x))) along ``axis``, stable for large and -inf entries."""
    return _backend(x).logsumexp(x, axis, keepdims)


def einsum(subscripts: str, *operands):
    """Einstein summation, e.g. ``einsum("bi,ijk,bj->bk", x, W, x)``."""
    return _backend(operands[0]).einsum(subscripts, *operands)


def linear(x, weight, bias=None):
    """``x @ weight + bias`` with ``weight`` of shape (in, out)."""
    return _backend(x).linear(x, weight, bias)


def dropout(x, rate: float, training: bool = True, key=None):
    """Zero each element with probability ``rate`` and scale the rest by 1 / (1 - rate).

    ``key``: on jax a ``jax.random.key`` (required: jax has no hidden random state); on numpy and
    torch an optional int seed. Returns ``x`` unchanged when ``training`` is false.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"dropout rate must be in [0, 1], got {rate}")
    return _backend(x).dropout(x, rate, training, key)


def rfft(x):
    """The discrete Fourier transform of real ``x`` along its last axis, non-negative frequencies only
    (n // 2 + 1 of them), as ``numpy.fft.rfft``."""
    return _backend(x).rfft(x)


def _tuple(v, n: int, what: str) -> tuple:
    t = (v,) * n if isinstance(v, int) else tuple(v)
    if len(t) != n or not all(isinstance(i, int) and i >= 0 for i in t):
        raise ValueError(f"{what} must be a non-negative int or a tuple of {n} of them, got {v!r}")
    return t


def resolve_padding(padding, kernel: tuple, stride: tuple, dilation: tuple) -> tuple:
    """((low, high), ...) per spatial axis from an int, a tuple of ints, "valid" or "same".

    "same" keeps the spatial size (stride 1 only, as in torch): the total d * (k - 1) is split with the
    odd element on the high side."""
    n = len(kernel)
    if padding == "valid":
        return ((0, 0),) * n
    if padding == "same":
        if any(s != 1 for s in stride):
            raise ValueError(f"padding='same' needs stride 1 (got stride {stride}); give the padding as ints")
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in _tuple(padding, n, "padding"))


def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1):
    """N-d convolution (cross-correlation, as torch), channels first: x (N, C, *spatial), weight
    (O, C // groups, *kernel), bias (O,). ``padding``: int, tuple, "valid" or "same"."""
    n = weight.ndim - 2
    stride, dilation = _tuple(stride, n, "stride"), _tuple(dilation, n, "dilation")
    pads = resolve_padding(padding, tuple(weight.shape[2:]), stride, dilation)
    return _backend(x).conv(x, weight, bias, stride, pads, dilation, groups)


def max_pool(x, window, stride=None, padding=0):
    """Max over windows of the spatial axes of x (N, C, *spatial); ``stride`` defaults to ``window``."""
    n = x.ndim - 2
    window = _tuple(window, n, "window")
    stride = window if stride is None else _tuple(stride, n, "stride")
    return _backend(x).pool(x, "max", window, stride, resolve_padding(padding, window, stride, (1,) * n))


def avg_pool(x, window, stride=None, padding=0):
    """Mean over windows of the spatial axes (padding counts as zeros, as torch's default)."""
    n = x.ndim - 2
    window = _tuple(window, n, "window")
    stride = window if stride is None else _tuple(stride, n, "stride")
    return _backend(x).pool(x, "avg", window, stride, resolve_padding(padding, window, stride, (1,) * n))


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    """(x - mean) / sqrt(var + eps) over the last axis, then * weight + bias."""
    return _backend(x).layer_norm(x, weight, bias, eps)


def rms_norm(x, weight=None, eps: float = 1e-6):
    """x / sqrt(mean(x^2) + eps) over the last axis, then * weight."""
    return _backend(x).rms_norm(x, weight, eps)


def embedding(weight, indices):
    """Rows of ``weight`` (num, dim) picked by integer ``indices``: shape indices.shape + (dim,)."""
    return _backend(weight).embedding(weight, indices)
