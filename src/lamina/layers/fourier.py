"""The textbook's second exercise: the leading half of the Fourier coefficients."""

from __future__ import annotations

from .. import ops
from ..module import Module


class LeadingFourier(Module):
    """The first half of the discrete Fourier coefficients of real data, along the last axis.

    Convention: for an input of length ``n`` on the last axis, the output holds the coefficients
    ``X_k = sum_t x_t exp(-2 pi i k t / n)`` for ``k = 0 .. ceil(n / 2) - 1``, that is ``(n + 1) // 2``
    of them (for n = 8: k = 0..3; for n = 5: k = 0..2), unnormalized, exactly
    ``numpy.fft.fft(x)[..., :(n + 1) // 2]``. The output is complex: complex64 for float32 input
    (complex128 for float64). With ``split=True`` it is real instead: the real parts followed by the
    imaginary parts, shape (..., 2 * ((n + 1) // 2)), ready for a ``Linear`` layer.

    No parameters; gradients flow through it on torch and jax.

    >>> import lamina as lm, numpy as np
    >>> lm.LeadingFourier()(np.ones((1, 5), "float32"))
    array([[5.+0.j, 0.+0.j, 0.+0.j]], dtype=complex64)
    """

    def __init__(self, split: bool = False):
        super().__init__()
        self.split = split

    def forward(self, x):
        n = x.shape[-1]
        coeffs = ops.rfft(x)[..., : (n + 1) // 2]
        if not self.split:
            return coeffs
        xp = ops.namespace(x)
        return xp.concat([xp.real(coeffs), xp.imag(coeffs)], axis=-1)

    def extra_repr(self):
        return "split=True" if self.split else ""
