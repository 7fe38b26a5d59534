"""The PyTorch backend. Parameter values are ``torch.nn.Parameter``s, so ``loss.backward()``,
``torch.optim``, ``torch.compile`` and ``torch.func`` work on them as on any torch model."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BackendError, DeviceError
from .base import Backend, normalise_device

#: 2-D convolutions on the CPU run on channels-last memory (NHWC strides; the shape stays (N, C, H, W)): oneDNN's
#: convolution and the pooling, activation and normalization after it are faster there, and their outputs stay
#: channels-last, so only the first convolution converts. Measured on this 2-core CPU, forward + backward:
#: issue 13's CNN (1x28x28, Conv 32 -> pool -> Conv 64 -> pool) 1.8x, a depthwise-separable block 1.7x, a
#: small conv/BatchNorm net 1.0-1.2x; training it with fit, 1.4x the hand-written NCHW loop. Reshape such an
#: output (``ops.reshape``, ``Flatten``), do not ``.view`` it. False: torch's default layout.
CONV2D_CHANNELS_LAST_ON_CPU = True

#: A parameter that asks for column-major memory (``Parameter(order="F")``: ``Linear``'s weight, which then has
#: torch.nn.Linear's (out, in) memory) gets it from this many elements on. Forward and backward, batch 128:
#: 784 -> 512 1012 vs 1048 us, 512 -> 10 58 vs 104 us; below it nothing was gained, and issue 13's
#: 64 -> 8 -> 1 model trained 3% slower with it (a cause not found: the ops alone take the same time).
COLUMN_MAJOR_FROM = 4096


class TorchBackend(Backend):
    name = "torch"
    array_name = "torch.Tensor"
    has_autodiff = True

    kernels_check_indices = True  # F.embedding raises IndexError for negative and too large indices

    def __init__(self):
        super().__init__()
        import array_api_compat.torch as xp

        self.xp = xp
        self.native_types.update({torch.Tensor, torch.nn.Parameter})

    def is_native(self, x) -> bool:
        return isinstance(x, torch.Tensor)

    def dtype(self, name: str):
        dt = getattr(torch, name, None)
        if not isinstance(dt, torch.dtype):
            raise BackendError(f"the torch backend has no dtype {name!r}")
        return dt

    def from_numpy(self, a, device=None, copy=True):
        if copy or not a.flags.writeable or not a.flags.c_contiguous:
            a = np.array(a, copy=True, order="C")
        if a.dtype.name == "bfloat16":  # ml_dtypes bfloat16: reinterpret the bits
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
        return self.to_device(t, device)

    def to_numpy(self, x):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()

    def _from_dlpack(self, x):
        return torch.from_dlpack(x)

    def make_parameter(self, value, trainable, order="C"):
        if (order == "F" and value.ndim == 2 and value.stride() != (1, value.shape[0]) and min(value.shape) > 1
                and value.numel() >= COLUMN_MAJOR_FROM):
            value = value.detach().t().contiguous().t()  # column-major: torch.nn.Linear's (out, in) memory
        elif order == "C" and not value.is_contiguous():
            value = value.detach().contiguous()
        elif isinstance(value, torch.nn.Parameter) and value.requires_grad == trainable:
            return value
        return torch.nn.Parameter(value.detach(), requires_grad=trainable and value.is_floating_point())

    def host_view(self, x):
        if x.device.type != "cpu" or not x.is_contiguous():
            return None
        x = x.detach()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()

    def mark_written(self, x):
        torch.autograd.graph.increment_version(x)

    def set_trainable(self, value, flag):
        value.requires_grad_(flag and value.is_floating_point())

    def assign(self, old, new):
        if (isinstance(old, torch.Tensor) and old.shape == new.shape and old.dtype == new.dtype
                and old.device == new.device):
            with torch.no_grad():
                old.copy_(new)
            return old
        return new

    def copy(self, x):
        return x.detach().clone()

    def no_grad(self):
        return torch.no_grad()

    # ----- devices -----------------------------------------------------------------------------------
    def devices(self):
        found = ["cpu"]
        if torch.cuda.is_available():
            found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return found

    def device_of(self, x):
        return normalise_device(x.device)

    def to_device(self, x, device):
        if device is None:
            return x
        device = normalise_device(device)
        if device not in self.devices():
            raise DeviceError(f"the torch backend has no device {device!r}; available: {self.devices()}")
        return x.to(device)

    # ----- autodiff ----------------------------------------------------------------------------------
    def value_and_grad(self, f, params, has_aux=False):
        paths = [p for p, v in params.items() if v.requires_grad]
        with torch.enable_grad():
            out = f(params)
            loss = out[0] if has_aux else out
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, [params[p] for p in paths], allow_unused=True)
            else:  # the loss does not depend on any parameter: every gradient is zero (as jax says)
                grads = [None] * len(paths)
        grads = {p: torch.zeros_like(params[p]) if g is None else _laid_out_like(g, params[p])
                 for p, g in zip(paths, grads)}
        return ((loss.detach(), out[1]) if has_aux else loss.detach()), grads

    # ----- native ops --------------------------------------------------------------------------------
    relu = staticmethod(torch.relu)
    tanh = staticmethod(torch.tanh)
    sigmoid = staticmethod(torch.sigmoid)

    def leaky_relu(self, x, negative_slope=0.01):
        return F.leaky_relu(x, negative_slope)

    def gelu(self, x, approximate=False):
        return F.gelu(x, approximate="tanh" if approximate else "none")

    def softmax(self, x, axis=-1):
        return torch.softmax(x, axis)

    def log_softmax(self, x, axis=-1):
        return torch.log_softmax(x, axis)

    def logsumexp(self, x, axis=-1, keepdims=False):
        return torch.logsumexp(x, axis, keepdims)

    einsum = staticmethod(torch.einsum)

    def linear(self, x, weight, bias=None):
        # Lamina's weights are (in, out), kept column-major (torch.nn.Linear's (out, in) memory: Linear asks for
        # order="F"), where torch's CPU kernels are ~6% faster than on row-major memory (the 784-512-512-10 MLP's
        # forward: 842 vs 899 us); addmm on 2-D input is the cheapest call (4.7 us vs 6.2 us for F.linear).
        if bias is not None and x.ndim == 2:
            return torch.addmm(bias, x, weight)
        y = torch.matmul(x, weight)
        return y if bias is None else y + bias

    def rfft(self, x):
        return torch.fft.rfft(x)

    def conv(self, x, w, b, stride, padding, dilation, groups):
        nd = len(stride)
        if any(lo != hi for lo, hi in padding):  # torch pads symmetrically: pad the uneven part first
            x = F.pad(x, [v for lo, hi in reversed(padding) for v in (lo, hi)])
            padding = [(0, 0)] * nd
        fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        if nd == 2 and CONV2D_CHANNELS_LAST_ON_CPU and x.device.type == "cpu":
            x = x.to(memory_format=torch.channels_last)  # a no-op when it is already (the previous conv's output)
        return fn(x, w, b, stride, [lo for lo, _ in padding], dilation, groups)

    def pool(self, x, kind, window, stride, padding):
        fn, pre_pad, pad = _pool_plan(kind, window, padding)
        if pre_pad is not None:
            x = F.pad(x, pre_pad, value=float("-inf") if kind == "max" else 0.0)
        if kind == "max":
            return fn(x, window, stride, pad)
        return fn(x, window, stride, pad, count_include_pad=True)

    def layer_norm(self, x, weight, bias, eps):
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)

    def rms_norm(self, x, weight, eps):
        return F.rms_norm(x, x.shape[-1:], weight, eps)

    def embedding(self, weight, indices):
        return F.embedding(indices.long() if indices.dtype != torch.int64 else indices, weight)

    def is_floating(self, x):
        return x.is_floating_point()

    def is_integral(self, x):
        return not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool

    def value_range(self, x):
        if x.numel() == 0 or torch.compiler.is_compiling():  # no host sync inside a compiled graph
            return None
        lo, hi = torch.aminmax(x.detach())
        return lo.item(), hi.item()

    def cross_entropy(self, logits, labels):
        if logits.ndim != 2:  # torch takes classes on axis 1; Lamina's are the last axis on every backend
            c = logits.shape[-1]
            logits = logits.reshape(-1, c)
            labels = labels.reshape(-1) if self.is_integral(labels) else labels.reshape(-1, c)
        if self.is_integral(labels):
            return F.cross_entropy(logits, labels.long())
        return F.cross_entropy(logits, labels)

    def binary_cross_entropy_with_logits(self, logits, targets):
        return F.binary_cross_entropy_with_logits(logits, targets)

    def mse(self, pred, target):
        return F.mse_loss(pred, target)

    def dropout(self, x, rate, training=True, key=None):
        if key is None or not training or rate == 0.0:
            return F.dropout(x, rate, training)
        gen = torch.Generator(device=x.device)
        gen.manual_seed(int(key))
        keep = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) >= rate
        return x * keep / (1.0 - rate)

    def stop_gradient(self, x):
        return x.detach()

    def fused_recurrent(self, kind, x, state, weights, num_layers, has_biases, bidirectional=False):
        # torch's own fused kernels (what torch.nn.RNN/GRU/LSTM call): measured 3x faster than a Python
        # loop of cell steps for an LSTM of 128 units over 100 steps
        fn = {"lstm": torch.lstm, "gru": torch.gru, "rnn_tanh": torch.rnn_tanh, "rnn_relu": torch.rnn_relu}[kind]
        out = fn(x, state, weights, has_biases, num_layers, 0.0, False, bidirectional, True)  # no dropout, batch first
        return (out[0], (out[1], out[2])) if kind == "lstm" else (out[0], out[1])

    def attention(self, q, k, v, mask):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum, eps):
        if not training:
            return F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps), \
                running_mean, running_var
        # the native kernel updates the statistics it is given in place: give it copies, stay pure
        mean, var = running_mean.detach().clone(), running_var.detach().clone()
        return F.batch_norm(x, mean, var, weight, bias, True, momentum, eps), mean, var


@functools.lru_cache(maxsize=256)
def _pool_plan(kind, window, padding):
    """The kernel and its padding for one pooling configuration, worked out once (the call path stays short).
    torch pads symmetrically and at most half the window: anything else is padded beforehand."""
    nd = len(window)
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1] if kind == "max" else (
        F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    if any(lo != hi for lo, hi in padding) or any(lo > k // 2 for (lo, _), k in zip(padding, window)):
        return fn, [v for lo, hi in reversed(padding) for v in (lo, hi)], [0] * nd
    return fn, None, [lo for lo, _ in padding]


def _laid_out_like(grad, param):
    """``grad`` with the memory layout of its (contiguous) parameter, as ``loss.backward()`` lays out ``.grad``
    (torch's gradient layout contract): a channels-last convolution's weight gradient comes back channels-last,
    and the fused optimizer kernels run slower on mixed layouts (measured: a user's loop on issue 13's CNN 0.87x
    of ``fit``)."""
    return grad if grad.stride() == param.stride() or not param.is_contiguous() else grad.contiguous()
