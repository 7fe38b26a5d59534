"""The d2l textbook's attention and Transformer encoder, written by hand as lm.Module subclasses with lm.ops only,
give the same outputs on every backend, and match a NumPy reference written independently below."""

from __future__ import annotations

import math

import numpy as np
import pytest

import lamina as lm

from conftest import BACKENDS, to_np

ops = lm.ops
B, T, D, HEADS, FFN = 2, 5, 8, 2, 16


# ----- the model, as a user writes it ------------------------------------------------------------------------
def masked_softmax(X, valid_lens):
    """Softmax over the last axis, with the keys at or past each valid length masked out."""
    if valid_lens is None:
        return ops.softmax(X, axis=-1)
    shape = X.shape
    if valid_lens.ndim == 1:
        valid_lens = ops.repeat(valid_lens, shape[1])
    else:
        valid_lens = ops.reshape(valid_lens, (-1,))
    mask = ops.sequence_mask(valid_lens, shape[-1])
    X = ops.masked_fill(ops.reshape(X, (-1, shape[-1])), ops.logical_not(mask), -1e6)
    return ops.softmax(ops.reshape(X, shape), axis=-1)


class DotProductAttention(lm.Module):
    def forward(self, queries, keys, values, valid_lens=None):
        d = queries.shape[-1]
        scores = ops.matmul(queries, ops.swapaxes(keys, 1, 2)) / math.sqrt(d)
        return ops.matmul(masked_softmax(scores, valid_lens), values)


class MultiHeadAttention(lm.Module):
    def __init__(self, num_hiddens, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.attention = DotProductAttention()
        self.W_q = lm.Linear(num_hiddens, num_hiddens, bias=False)
        self.W_k = lm.Linear(num_hiddens, num_hiddens, bias=False)
        self.W_v = lm.Linear(num_hiddens, num_hiddens, bias=False)
        self.W_o = lm.Linear(num_hiddens, num_hiddens, bias=False)

    def transpose_qkv(self, X):
        X = ops.reshape(X, (X.shape[0], X.shape[1], self.num_heads, -1))
        X = ops.permute_dims(X, (0, 2, 1, 3))
        return ops.reshape(X, (-1, X.shape[2], X.shape[3]))

    def transpose_output(self, X):
        X = ops.reshape(X, (-1, self.num_heads, X.shape[1], X.shape[2]))
        X = ops.permute_dims(X, (0, 2, 1, 3))
        return ops.reshape(X, (X.shape[0], X.shape[1], -1))

    def forward(self, queries, keys, values, valid_lens):
        queries = self.transpose_qkv(self.W_q(queries))
        keys = self.transpose_qkv(self.W_k(keys))
        values = self.transpose_qkv(self.W_v(values))
        if valid_lens is not None:
            valid_lens = ops.repeat(valid_lens, self.num_heads, axis=0)
        return self.W_o(self.transpose_output(self.attention(queries, keys, values, valid_lens)))


class PositionalEncoding(lm.Module):
    """P[t, 2i] = sin(t / 10000^(2i/d)), P[t, 2i+1] = cos(...); built in forward from lm.ops creation functions,
    which take the module's backend and device without being told."""

    def __init__(self, num_hiddens):
        super().__init__()
        self.num_hiddens = num_hiddens

    def forward(self, X):
        t = ops.reshape(ops.arange(X.shape[1], dtype="float32"), (-1, 1))
        freq = ops.pow(10000.0, ops.arange(0, self.num_hiddens, 2, dtype="float32") / self.num_hiddens)
        angles = t / freq
        P = ops.reshape(ops.stack([ops.sin(angles), ops.cos(angles)], axis=-1), (1, X.shape[1], self.num_hiddens))
        return X + P


class PositionWiseFFN(lm.Module):
    def __init__(self, num_hiddens, ffn_hiddens):
        super().__init__()
        self.dense1 = lm.Linear(num_hiddens, ffn_hiddens)
        self.dense2 = lm.Linear(ffn_hiddens, num_hiddens)

    def forward(self, X):
        return self.dense2(ops.relu(self.dense1(X)))


class AddNorm(lm.Module):
    def __init__(self, num_hiddens):
        super().__init__()
        self.ln = lm.LayerNorm(num_hiddens)

    def forward(self, X, Y):
        return self.ln(Y + X)


class TransformerEncoderBlock(lm.Module):
    def __init__(self, num_hiddens, ffn_hiddens, num_heads):
        super().__init__()
        self.attention = MultiHeadAttention(num_hiddens, num_heads)
        self.addnorm1 = AddNorm(num_hiddens)
        self.ffn = PositionWiseFFN(num_hiddens, ffn_hiddens)
        self.addnorm2 = AddNorm(num_hiddens)

    def forward(self, X, valid_lens):
        Y = self.addnorm1(X, self.attention(X, X, X, valid_lens))
        return self.addnorm2(Y, self.ffn(Y))


class Encoder(lm.Module):
    def __init__(self):
        super().__init__()
        self.pos = PositionalEncoding(D)
        self.blocks = lm.ModuleList([TransformerEncoderBlock(D, FFN, HEADS) for _ in range(2)])

    def forward(self, X, valid_lens):
        X = self.pos(X * math.sqrt(D))
        for blk in self.blocks:
            X = blk(X, valid_lens)
        return X


# ----- an independent NumPy reference (float64) --------------------------------------------------------------
def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


def np_mha(W, prefix, X, valid_lens):
    """Per-head attention with explicit loops over batch and heads."""
    q, k, v = (X @ W[f"{prefix}.W_{n}.weight"] for n in "qkv")
    dh = D // HEADS
    out = np.zeros_like(q)
    for b in range(X.shape[0]):
        for h in range(HEADS):
            s = slice(h * dh, (h + 1) * dh)
            scores = q[b, :, s] @ k[b, :, s].T / math.sqrt(dh)
            scores[:, valid_lens[b]:] = -1e6
            out[b, :, s] = np_softmax(scores) @ v[b, :, s]
    return out @ W[f"{prefix}.W_o.weight"]


def np_encoder(W, X, valid_lens):
    T_ = X.shape[1]
    P = np.zeros((T_, D))
    for t in range(T_):
        for i in range(0, D, 2):
            P[t, i] = math.sin(t / 10000 ** (i / D))
            P[t, i + 1] = math.cos(t / 10000 ** (i / D))
    X = X * math.sqrt(D) + P
    for n in range(2):
        p = f"blocks.{n}"
        Y = np_layer_norm(np_mha(W, f"{p}.attention", X, valid_lens) + X, W[f"{p}.addnorm1.ln.weight"],
                          W[f"{p}.addnorm1.ln.bias"])
        F = np.maximum(Y @ W[f"{p}.ffn.dense1.weight"] + W[f"{p}.ffn.dense1.bias"], 0)
        F = F @ W[f"{p}.ffn.dense2.weight"] + W[f"{p}.ffn.dense2.bias"]
        X = np_layer_norm(F + Y, W[f"{p}.addnorm2.ln.weight"], W[f"{p}.addnorm2.ln.bias"])
    return X


# ----- the tests ---------------------------------------------------------------------------------------------
X_IN = np.random.default_rng(0).standard_normal((B, T, D)).astype(np.float32)
LENS = np.array([3, 5], np.int64)


def random_weights(model) -> dict:
    """Every entry of the model's state dict drawn from one NumPy stream (so no backend's initializer is trusted)."""
    rng = np.random.default_rng(42)
    return {k: (rng.standard_normal(to_np(v).shape) * 0.5 + (1.0 if k.endswith("ln.weight") else 0.0)).astype(
        np.float32) for k, v in model.state_dict().items()}


def array_api_backends():
    return [b for b in BACKENDS if hasattr(lm.get_backend(b).xp, "__array_api_version__")]


def run(backend, weights):
    lm.set_backend(backend)
    model = Encoder()
    model.load_state_dict(weights)
    model.eval()
    b = lm.get_backend(backend)
    return model, to_np(model(b.from_numpy(X_IN), b.from_numpy(LENS)))


def test_encoder_matches_an_independent_numpy_reference(backend):
    if backend not in array_api_backends():
        pytest.skip(f"the {backend} adapter's namespace is not an Array API namespace")
    weights = random_weights(Encoder())
    _, out = run(backend, weights)
    want = np_encoder({k: v.astype(np.float64) for k, v in weights.items()}, X_IN.astype(np.float64), LENS)
    assert out.shape == (B, T, D) and out.dtype == np.float32
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


def test_same_weights_give_the_same_outputs_on_every_backend():
    backends = array_api_backends()
    lm.set_backend(backends[0])
    lm.manual_seed(3)
    source = Encoder()
    source(lm.get_backend(backends[0]).from_numpy(X_IN), lm.get_backend(backends[0]).from_numpy(LENS))
    weights = {k: to_np(v) for k, v in source.state_dict().items()}
    outs = {b: run(b, weights) for b in backends}
    first = outs[backends[0]][1]
    for b, (model, out) in outs.items():
        np.testing.assert_allclose(out, first, rtol=1e-5, atol=1e-5, err_msg=b)
        # and the state dict travels back unchanged
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(to_np(v), weights[k], err_msg=f"{b}: {k}")


def test_attention_masks_padded_keys(backend):
    if backend not in array_api_backends():
        pytest.skip(f"the {backend} adapter's namespace is not an Array API namespace")
    b = lm.get_backend(backend)
    scores = b.from_numpy(np.zeros((2, 3, 4), np.float32))
    w = to_np(masked_softmax(scores, b.from_numpy(np.array([1, 3]))))
    np.testing.assert_allclose(w[0], np.tile([1, 0, 0, 0], (3, 1)), atol=1e-6)
    np.testing.assert_allclose(w[1], np.tile([1 / 3, 1 / 3, 1 / 3, 0], (3, 1)), atol=1e-6)
    w2 = to_np(masked_softmax(scores, b.from_numpy(np.array([[1, 2, 3], [4, 4, 1]]))))
    np.testing.assert_allclose(w2[1, 2], [1, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(w2[0, 1], [0.5, 0.5, 0, 0], atol=1e-6)
