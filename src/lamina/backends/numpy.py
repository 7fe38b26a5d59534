"""The NumPy backend: inference and serving with no heavy dependency. No autodiff."""

from __future__ import annotations

import numpy as np

from .base import Backend


class NumpyBackend(Backend):
    name = "numpy"
    array_name = "numpy.ndarray"

    def __init__(self):
        super().__init__()
        import array_api_compat.numpy as xp

        self.xp = xp
        self.native_types.add(np.ndarray)

    def is_native(self, x) -> bool:
        return isinstance(x, np.ndarray)

    def dtype(self, name: str):
        if name == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(name)

    def dtype_name(self, x) -> str:
        return str(x.dtype)

    def from_numpy(self, a, device=None, copy=True):
        self.to_device(None, device)  # validates the device name
        return np.array(a, copy=True) if copy or not a.flags.writeable else np.asarray(a)

    def to_numpy(self, x):
        return x

    def from_other(self, x, device=None):
        # np.from_dlpack views are read-only for jax arrays; parameters must be writable, so copy.
        out = super().from_other(x, device)
        return out if out.flags.writeable else out.copy()

    def _from_dlpack(self, x):
        return np.from_dlpack(x.detach() if hasattr(x, "detach") else x)

    def host_view(self, x):
        return x if x.flags.writeable and x.flags.c_contiguous else None

    def assign(self, old, new):
        if isinstance(old, np.ndarray) and old.shape == new.shape and old.dtype == new.dtype:
            old[...] = new
            return old
        return new

    def copy(self, x):
        return np.array(x, copy=True)

    # Native ops: plain numpy avoids the compat wrappers' Python-level dtype promotion. The hot ones are
    # static so that a layer's call does not build a bound method each time.
    @staticmethod
    def relu(x):
        return np.maximum(x, 0)  # a Python 0 keeps x's dtype (NEP 50)

    def tanh(self, x):
        return np.tanh(x)

    def sigmoid(self, x):
        return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype, copy=False)

    def einsum(self, subscripts, *operands):
        return np.einsum(subscripts, *operands, optimize=len(operands) > 2)

    @staticmethod
    def linear(x, weight, bias=None):
        return x @ weight if bias is None else x @ weight + bias

    def rfft(self, x):
        return np.fft.rfft(x)
