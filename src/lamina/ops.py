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

from .backends import backend_of
from .errors import BackendError

__all__ = ["relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softmax", "log_softmax", "logsumexp", "einsum",
           "linear", "dropout", "rfft"]


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
