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

from .. import random
from .core import _backend, asarray, int_tuple

__all__ = ["relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softmax", "log_softmax", "logsumexp", "einsum",
           "linear", "dropout", "rfft", "conv", "pool", "max_pool", "avg_pool", "layer_norm", "rms_norm",
           "embedding", "resolve_padding", "batch_norm", "attention", "attention_mask", "scan", "stop_gradient",
           "recurrent"]


# Kernels of the hottest ops by array type, so that a call costs one dict lookup (a KeyError on a new type
# fills the entry). Cheaper than finding the backend, then the method (measured ~30 ns a call less).
_LINEAR: dict = {}
_RELU: dict = {}


def _kernel(table: dict, name: str, x):
    fn = getattr(_backend(x), name)
    table[type(x)] = fn
    return fn


def relu(x):
    """max(x, 0) elementwise; its gradient at 0 is 0 on every backend."""
    try:
        return _RELU[type(x)](x)
    except KeyError:
        return _kernel(_RELU, "relu", x)(x)


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
    try:  # the hot path of every dense layer: one dict lookup straight to the kernel (measured ~75 ns)
        return _LINEAR[type(x)](x, weight, bias)
    except KeyError:
        return _kernel(_LINEAR, "linear", x)(x, weight, bias)


def dropout(x, rate: float, training: bool = True, key=None):
    """Zero each element with probability ``rate`` and scale the rest by 1 / (1 - rate).

    Returns ``x`` unchanged when ``training`` is false or ``rate`` is 0. ``key``: a ``jax.random.key`` or
    an int seed; ``None`` draws one through ``lamina.random`` (from the key scope of a compiled train step,
    else from the host stream that ``lm.manual_seed`` resets, so eager runs repeat). Under your own
    ``jax.jit`` pass ``key=`` (or open ``lm.random.key_scope``): a drawn seed would be fixed at trace time.

    >>> import lamina as lm, numpy as np
    >>> lm.ops.dropout(np.ones(4), 0.5, training=False)
    array([1., 1., 1., 1.])
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"dropout rate must be in [0, 1], got {rate}")
    b = _backend(x)
    if not training or rate == 0.0:
        return x
    if key is None:
        key = random.next_key(b)
    return b.dropout(x, rate, True, key)


def rfft(x):
    """The discrete Fourier transform of real ``x`` along its last axis, non-negative frequencies only
    (n // 2 + 1 of them), as ``numpy.fft.rfft``."""
    return _backend(x).rfft(x)


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
    if isinstance(padding, tuple | list) and padding and all(isinstance(p, tuple | list) for p in padding):
        pads = tuple((int_tuple(p, 2, "padding")) for p in padding)  # already ((low, high), ...)
        if len(pads) != n:
            raise ValueError(f"padding needs {n} (low, high) pairs, got {padding!r}")
        return pads
    return tuple((p, p) for p in int_tuple(padding, n, "padding"))


def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1):
    """N-d convolution (cross-correlation, as torch), channels first: x (N, C, *spatial), weight
    (O, C // groups, *kernel), bias (O,). ``padding``: int, tuple, ((low, high), ...), "valid" or "same".
    Inputs whose rank or channel count do not fit the weight are a ``ValueError`` before any kernel runs.

    >>> import lamina as lm, numpy as np
    >>> lm.ops.conv(np.ones((1, 2, 5), "float32"), np.ones((3, 2, 3), "float32"), padding="same").shape
    (1, 3, 5)
    """
    n = weight.ndim - 2
    if x.ndim != weight.ndim or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"conv: weight {tuple(weight.shape)} with groups={groups} needs input (N, "
                         f"{weight.shape[1] * groups}, ...) with {n} spatial axes, got shape {tuple(x.shape)}")
    # a layer passes its arguments resolved once at construction: skip the normalising for those (the call
    # path of Conv2d must cost no more than torch.nn.Conv2d's, DESIGN.md rule 4)
    if type(stride) is not tuple or len(stride) != n:
        stride = int_tuple(stride, n, "stride")
    if type(dilation) is not tuple or len(dilation) != n:
        dilation = int_tuple(dilation, n, "dilation")
    if type(padding) is tuple and len(padding) == n and type(padding[0]) is tuple:  # ((low, high), ...) already
        pads = padding
    else:
        pads = resolve_padding(padding, tuple(weight.shape[2:]), stride, dilation)
    try:
        y = _backend(x).conv(x, weight, bias, stride, pads, dilation, groups)
    except Exception:
        _check_conv_fits(x, weight, stride, pads, dilation)  # a clear error where the kernel's is raw
        raise
    return y


def _check_conv_fits(x, weight, stride, pads, dilation) -> None:
    kernel, spatial = tuple(weight.shape[2:]), tuple(x.shape[2:])
    for size, k, d, (lo, hi) in zip(spatial, kernel, dilation, pads):
        if size is not None and size + lo + hi < d * (k - 1) + 1:
            reach = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
            raise ValueError(f"conv: input spatial size {spatial} is smaller than the kernel {kernel}"
                             f"{f' (reach {reach} with dilation {dilation})' if reach != kernel else ''} even with "
                             f"padding {pads}; feed larger inputs, pad them (padding=...), or use a smaller kernel")


def pool(x, kind: str, window, stride=None, padding=0):
    """Max (``kind="max"``) or average (``"avg"``, padding counted as zeros, as torch's default) over
    windows of the spatial axes of x (N, C, *spatial); ``stride`` defaults to ``window``; ``padding`` as
    ``conv``. An int ``window`` covers every spatial axis.

    >>> import lamina as lm, numpy as np
    >>> lm.ops.pool(np.arange(4.0).reshape(1, 1, 4), "max", 2)
    array([[[1., 3.]]])
    """
    if kind not in ("max", "avg"):
        raise ValueError(f"pool: kind must be 'max' or 'avg', got {kind!r}")
    shape = tuple(x.shape)
    n = len(shape) - 2
    if n < 1:
        raise ValueError(f"pool: expects inputs (N, C, *spatial), got shape {shape}")
    # a layer passes its arguments resolved once at construction: skip the normalising for those (the call
    # path of MaxPool2d must stay cheap, DESIGN.md rule 4)
    if type(window) is not tuple or len(window) != n:
        window = int_tuple(window, n, "window")
    if stride is None:
        stride = window
    elif type(stride) is not tuple or len(stride) != n:
        stride = int_tuple(stride, n, "stride")
    if type(padding) is tuple and len(padding) == n and type(padding[0]) is tuple:
        pads = padding
    else:
        pads = resolve_padding(padding, window, stride, (1,) * n)
    b = _backend(x)
    try:
        return b.pool(x, kind, window, stride, pads)
    except Exception:  # the kernels refuse bad input with their own errors (an empty output too): explain it
        _check_pool_input(b, x, shape, window, pads)
        raise


def _check_pool_input(b, x, shape, window, pads) -> None:
    if not b.is_floating(x):
        raise TypeError(f"pool: takes floating-point input, got {b.dtype_name(x)}; cast it first, e.g. "
                        "lm.ops.astype(x, 'float32')")
    if shape[1] == 0:
        raise ValueError(f"pool: the input has no channels (shape {shape}); expects (N, C, *spatial) with C >= 1")
    for i, (size, w, (lo, hi)) in enumerate(zip(shape[2:], window, pads)):
        if size + lo + hi < w:
            raise ValueError(f"pool: spatial axis {i + 2} of the input (shape {shape}) is smaller than the window "
                             f"{window} even with padding {pads}")


def max_pool(x, window, stride=None, padding=0):
    """Max over windows of the spatial axes of x (N, C, *spatial); ``stride`` defaults to ``window``
    (``pool(x, "max", ...)``)."""
    return pool(x, "max", window, stride, padding)


def avg_pool(x, window, stride=None, padding=0):
    """Mean over windows of the spatial axes (padding counts as zeros, as torch's default)."""
    return pool(x, "avg", window, stride, padding)


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    """(x - mean) / sqrt(var + eps) over the last axis, then * weight + bias (each (d,) or None)."""
    if weight is not None and x.shape[-1:] != weight.shape:
        raise ValueError(f"layer_norm: weight {tuple(weight.shape)} needs input (..., {weight.shape[0]}), got "
                         f"shape {tuple(x.shape)}")
    return _backend(x).layer_norm(x, weight, bias, eps)


def rms_norm(x, weight=None, eps: float = 1e-6):
    """x / sqrt(mean(x^2) + eps) over the last axis, then * weight ((d,) or None)."""
    if weight is not None and x.shape[-1:] != weight.shape:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} needs input (..., {weight.shape[0]}), got "
                         f"shape {tuple(x.shape)}")
    return _backend(x).rms_norm(x, weight, eps)


def embedding(weight, indices):
    """Rows of ``weight`` (num, dim) picked by integer ``indices``: shape indices.shape + (dim,).

    ``indices`` may be NumPy or a list (converted to ``weight``'s backend). Non-integer indices are a
    ``TypeError``; indices outside [0, num) a ``ValueError`` wherever their values are known (jax under
    tracing cannot raise: there an out-of-range index gives a row of NaN, never a clamped row).

    >>> import lamina as lm, numpy as np
    >>> lm.ops.embedding(np.eye(3, dtype="float32"), [2, 0])
    array([[0., 0., 1.],
           [1., 0., 0.]], dtype=float32)
    """
    b = _backend(weight)
    if type(indices) not in b.native_types:
        indices = asarray(indices, like=weight)
    if not b.is_integral(indices):
        raise TypeError(f"embedding: indices must be integers, got dtype {b.dtype_name(indices)}; "
                        "round or cast them to an integer dtype first")
    if b.kernels_check_indices:  # torch's kernel refuses bad indices itself: explain only after it did
        try:
            return b.embedding(weight, indices)
        except (IndexError, RuntimeError) as e:
            _check_indices(b, weight, indices)
            raise e
    _check_indices(b, weight, indices)
    return b.embedding(weight, indices)


def _check_indices(b, weight, indices) -> None:
    bounds = b.value_range(indices)
    if bounds is not None and (bounds[0] < 0 or bounds[1] >= weight.shape[0]):
        bad = bounds[0] if bounds[0] < 0 else bounds[1]
        raise ValueError(f"embedding: index {bad} is out of range for a table of {weight.shape[0]} rows; "
                         f"indices must be in [0, {weight.shape[0] - 1}]")


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5):
    """Batch normalization over every axis but 1 (the channels) of x (N, C, ...), as
    ``torch.nn.functional.batch_norm``, but pure: returns ``(y, new_running_mean, new_running_var)``.

    Training mode normalizes with the batch statistics and returns the running ones updated
    (``(1 - momentum) * running + momentum * batch``, unbiased variance, no gradient through them); eval
    mode normalizes with the running ones and returns them unchanged. ``weight``/``bias`` (C,) or None.
    An empty batch in training mode, or a channel count that differs from the statistics', is a
    ``ValueError``.

    >>> import lamina as lm, numpy as np
    >>> y, m, v = lm.ops.batch_norm(np.array([[0.0], [2.0]]), np.zeros(1), np.ones(1), training=True)
    >>> y.ravel().round(3), m, v
    (array([-1.,  1.]), array([0.1]), array([1.1]))
    """
    b = _backend(x)
    c = running_mean.shape[0]
    if x.ndim < 2 or x.shape[1] != c:
        raise ValueError(f"batch_norm: running statistics of {c} channels need input (N, {c}, ...), got shape "
                         f"{tuple(x.shape)}")
    if training and 0 in tuple(x.shape):
        raise ValueError(f"batch_norm: an empty batch (shape {tuple(x.shape)}) has no statistics to normalize "
                         "with or to update the running ones; skip empty batches, or use eval mode")
    if training and x.shape[0] == 1 and all(s == 1 for s in tuple(x.shape)[2:]):  # torch's rule and words
        raise ValueError(f"batch_norm: Expected more than 1 value per channel when training, got input shape "
                         f"{tuple(x.shape)} (one value per channel: its variance is undefined). Use batches of "
                         "at least 2, or eval mode (model.eval()) for a single example")
    return b.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def attention(q, k, v, mask=None):
    """Scaled dot-product attention, softmax(q k^T / sqrt(d)) v per head, batch first with the heads as
    axis 2: q (N, Lq, heads, d), k (N, Lk, heads, d), v (N, Lk, heads, dv) -> (N, Lq, heads, dv).
    ``mask``: boolean, broadcastable to (N, heads, Lq, Lk), True where a query may attend a key (see
    ``attention_mask``). Native kernels: ``F.scaled_dot_product_attention``, ``jax.nn.dot_product_attention``.

    >>> import lamina as lm, numpy as np
    >>> lm.ops.attention(*[np.ones((1, 3, 2, 4), "float32")] * 3).shape
    (1, 3, 2, 4)
    """
    if (q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]
            or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]):
        raise ValueError(f"attention: expects q (N, Lq, heads, d), k (N, Lk, heads, d), v (N, Lk, heads, dv); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return _backend(q).attention(q, k, v, mask)


def attention_mask(query, key, key_padding_mask=None, causal: bool = False):
    """The boolean mask for ``attention``, shape (N, 1, Lq, Lk), True where a query may attend a key, for
    query (N, Lq, ...) and key (N, Lk, ...); None when nothing is masked. ``key_padding_mask`` (N, Lk) is
    True where a key is padding (torch's convention; NumPy is fine); ``causal=True`` lets position i
    attend only positions <= i.

    >>> import lamina as lm, numpy as np
    >>> lm.ops.attention_mask(np.zeros((1, 2, 4)), np.zeros((1, 2, 4)), causal=True)[0, 0]
    array([[ True, False],
           [ True,  True]])
    """
    n, lq, lk = query.shape[0], query.shape[1], key.shape[1]
    if key_padding_mask is not None:
        key_padding_mask = asarray(key_padding_mask, like=query)
        if tuple(key_padding_mask.shape) != (n, lk):
            raise ValueError(f"attention_mask: key_padding_mask must have shape (N, Lk) = {(n, lk)}, got "
                             f"{tuple(key_padding_mask.shape)}")
    return _backend(query).attention_mask(key_padding_mask, causal, n, lq, lk)


def scan(fn, carry, xs):
    """``fn(carry, x) -> (carry, y)`` over the leading axis of the array ``xs``; returns ``(final carry,
    stacked ys)``. ``jax.lax.scan`` on jax (one compiled loop whatever the length), a Python loop elsewhere.

    >>> import lamina as lm, numpy as np
    >>> lm.ops.scan(lambda c, x: (c + x, c + x), np.zeros(2), np.ones((3, 2)))[1][:, 0]
    array([1., 2., 3.])
    """
    return _backend(xs).scan(fn, carry, xs)


def stop_gradient(x):
    """``x``, cut off from automatic differentiation (its gradient is zero); a no-op on numpy."""
    return _backend(x).stop_gradient(x)


_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}


def recurrent(x, weights, state=None, kind: str = "lstm", bidirectional: bool = False):
    """A multi-layer recurrent network over a batch-first sequence, torch's equations and gate orders.

    ``kind``: ``"rnn_tanh"``, ``"rnn_relu"``, ``"gru"`` (gates r, z, n) or ``"lstm"`` (i, f, g, o).
    ``x`` (N, T, F); ``weights``: per layer ``(w_ih (G*H, in), w_hh (G*H, H), b_ih (G*H,) or None,
    b_hh (G*H,) or None)`` in torch's layout; ``state``: h0 (layers, N, H), for lstm ``(h0, c0)``, or None
    for zeros (NumPy is fine). Returns ``(outputs (N, T, H), h_n)``, for lstm ``(outputs, (h_n, c_n))``.
    ``bidirectional=True``: torch's layout, ``weights`` per layer then direction (``l0``, ``l0_reverse``,
    ``l1``, ...), the reverse direction reads the sequence backwards, outputs (N, T, 2H) (forward half
    first), states (2 * layers, N, H); layers after the first take 2H input features.
    Runs the backend's fused kernel where it has one (torch: ``torch.lstm`` & co.), else the cell through
    ``scan``. Input and state sizes are checked (``ValueError``) before any kernel runs.

    >>> import lamina as lm, numpy as np
    >>> w = [(np.zeros((8, 3), "float32"), np.zeros((8, 2), "float32"), None, None)]
    >>> out, (h, c) = lm.ops.recurrent(np.ones((4, 5, 3), "float32"), w)
    >>> out.shape, h.shape
    ((4, 5, 2), (1, 4, 2))
    """
    gates = _GATES.get(kind)
    if gates is None:
        raise ValueError(f"recurrent: kind must be one of {list(_GATES)}, got {kind!r}")
    b = _backend(x)
    if not weights:
        raise ValueError("recurrent: weights must hold (w_ih, w_hh, b_ih, b_hh) for at least one layer")
    w_ih, w_hh = weights[0][0], weights[0][1]
    dirs = 2 if bidirectional else 1
    if len(weights) % dirs:
        raise ValueError(f"recurrent: bidirectional weights come in (forward, reverse) pairs per layer, got "
                         f"{len(weights)} entries")
    hidden, num_layers = w_hh.shape[1], len(weights) // dirs
    dtype = b.dtype_name(x)
    if not dtype.startswith(("float", "bfloat")):
        raise TypeError(f"recurrent ({kind}): expects floating-point input, got dtype {dtype}; cast it first, "
                        "e.g. lm.ops.astype(x, 'float32') (token ids go through an lm.Embedding first)")
    if x.ndim != 3 or x.shape[2] != w_ih.shape[1]:
        raise ValueError(f"recurrent ({kind}): weights for {w_ih.shape[1]} input features need input (N, T, "
                         f"{w_ih.shape[1]}), got shape {tuple(x.shape)}")
    if x.shape[1] == 0:  # torch refuses, jax would return an empty sequence and zero states: one rule for all
        raise ValueError(f"recurrent ({kind}): the sequence is empty (input shape {tuple(x.shape)}, length 0 on "
                         "the time axis); feed sequences of at least one step, or skip empty ones")
    expected = (num_layers * dirs, x.shape[0], hidden)
    xp = b.xp
    lstm = kind == "lstm"
    if state is None:
        unknown = x.shape[0] is None  # a batch of any size, as traced for lm.export: take it from x at run time
        zeros = xp.zeros((expected[0], 1, hidden) if unknown else expected, dtype=x.dtype)
        device = b.device_of(x)
        if device != "cpu":
            zeros = b.to_device(zeros, device)
        if unknown:
            zeros = zeros + xp.zeros_like(x[:, :1, 0])[None]  # (layers, 1, H) + (1, N, 1)
        state = (zeros, zeros) if lstm else zeros
    else:
        if lstm:
            if not isinstance(state, tuple | list) or len(state) != 2:
                raise ValueError(f"recurrent (lstm): state must be a pair (h0, c0), got {type(state).__name__}")
            state = (asarray(state[0], like=x), asarray(state[1], like=x))
        else:
            state = asarray(state, like=x)
        for s in (state if lstm else (state,)):
            if tuple(s.shape) != expected:
                raise ValueError(f"recurrent ({kind}): expected state of shape (layers, N, H) = {expected}, "
                                 f"got {tuple(s.shape)}")
    has_biases = weights[0][2] is not None
    flat = [w for layer in weights for w in (layer if has_biases else layer[:2])]
    fused = b.fused_recurrent(kind, x, state, flat, num_layers, has_biases, bidirectional=bidirectional)
    if fused is not None:
        return fused
    cell = _cell(b, kind, hidden)
    finals = []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w_ih, w_hh, b_ih, b_hh = weights[k]
            proj = x @ xp.permute_dims(w_ih, (1, 0))  # every time step's input projection in one matmul
            if b_ih is not None:
                proj = proj + b_ih
            w_hh_t = xp.permute_dims(w_hh, (1, 0))

            def step(carry, p_t, w_hh_t=w_hh_t, b_hh=b_hh):
                return cell(carry, p_t, w_hh_t, b_hh)

            carry0 = (state[0][k], state[1][k]) if lstm else state[k]
            steps = xp.permute_dims(proj, (1, 0, 2))  # time major
            if d:  # the reverse direction reads the sequence backwards; its outputs stay aligned with time
                steps = xp.flip(steps, axis=0)
            carry, ys = b.scan(step, carry0, steps)
            finals.append(carry)
            outs.append(xp.flip(ys, axis=0) if d else ys)
        x = xp.permute_dims(outs[0] if dirs == 1 else xp.concat(outs, axis=-1), (1, 0, 2))
    if lstm:
        return x, (xp.stack([h for h, _ in finals]), xp.stack([c for _, c in finals]))
    return x, xp.stack(finals)


def _cell(b, kind: str, H: int):
    """One time step of ``kind``: ``cell(carry, p_t, w_hh_t, b_hh) -> (carry, h)``, with p_t the input's
    projection at that step."""
    if kind in ("rnn_tanh", "rnn_relu"):
        act = b.tanh if kind == "rnn_tanh" else b.relu

        def rnn(h, p_t, w_hh_t, b_hh):
            z = p_t + h @ w_hh_t
            h = act(z if b_hh is None else z + b_hh)
            return h, h

        return rnn
    if kind == "gru":
        def gru(h, p_t, w_hh_t, b_hh):
            hh = h @ w_hh_t
            if b_hh is not None:
                hh = hh + b_hh
            r = b.sigmoid(p_t[:, :H] + hh[:, :H])
            z = b.sigmoid(p_t[:, H:2 * H] + hh[:, H:2 * H])
            n = b.tanh(p_t[:, 2 * H:] + r * hh[:, 2 * H:])
            h = (1 - z) * n + z * h
            return h, h

        return gru

    def lstm(carry, p_t, w_hh_t, b_hh):
        h, c = carry
        z = p_t + h @ w_hh_t
        if b_hh is not None:
            z = z + b_hh
        i, f = b.sigmoid(z[:, :H]), b.sigmoid(z[:, H:2 * H])
        g, o = b.tanh(z[:, 2 * H:3 * H]), b.sigmoid(z[:, 3 * H:])
        c = f * c + i * g
        h = o * b.tanh(c)
        return (h, c), h

    return lstm
