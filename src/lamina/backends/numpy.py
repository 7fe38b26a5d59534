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

    # A correct, if slower, convolution for inference: windows through sliding_window_view, one
    # tensordot per group.
    def conv(self, x, w, b, stride, padding, dilation, groups):
        nd = len(stride)
        x = np.pad(x, [(0, 0), (0, 0), *padding])
        kernel = w.shape[2:]
        span = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
        win = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, 2 + nd)))
        # win: (N, C, *out_full, *span) -> stride over outputs, dilation inside the window
        win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)
                  + tuple(slice(None, None, d) for d in dilation)]
        cin = w.shape[1]
        outs = []
        for g in range(groups):
            patch = win[:, g * cin:(g + 1) * cin]
            wg = w[g * (w.shape[0] // groups):(g + 1) * (w.shape[0] // groups)]
            # patch (N, cin, *out, *k) . wg (o, cin, *k) -> (N, *out, o)
            y = np.tensordot(patch, wg, axes=([1, *range(2 + nd, 2 + 2 * nd)], [1, *range(2, 2 + nd)]))
            outs.append(np.moveaxis(y, -1, 1))
        y = np.concatenate(outs, axis=1) if groups > 1 else outs[0]
        if b is not None:
            y = y + b.reshape(1, -1, *([1] * nd))
        return y.astype(np.result_type(x, w), copy=False)

    def pool(self, x, kind, window, stride, padding):
        if x.dtype.kind != "f" or any(s + lo + hi < w for s, w, (lo, hi) in zip(x.shape[2:], window, padding)):
            raise ValueError("pool: floating-point input at least as large as the window")  # ops.pool explains
        nd = len(window)
        fill = -np.inf if kind == "max" else 0
        x = np.pad(x, [(0, 0), (0, 0), *padding], constant_values=fill)
        win = np.lib.stride_tricks.sliding_window_view(x, window, axis=tuple(range(2, 2 + nd)))
        win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)]
        axes = tuple(range(-nd, 0))
        return win.max(axis=axes) if kind == "max" else win.mean(axis=axes)

    def embedding(self, weight, indices):
        return weight[indices]

    def value_range(self, x):
        return (x.min().item(), x.max().item()) if x.size else None
