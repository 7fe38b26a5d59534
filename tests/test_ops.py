"""lm.ops on every backend against NumPy (and torch.nn.functional) references."""

import math

import numpy as np
import pytest

import lamina as lm

from conftest import BACKENDS, GRAD_BACKENDS, rand, to_np


def on(backend, x):
    return lm.get_backend(backend).from_numpy(np.asarray(x))


def np_logsumexp(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    return (np.log(np.exp(x - m).sum(axis=axis, keepdims=True)) + m).squeeze(axis)


ERF = np.vectorize(math.erf)
X = np.array([[-3.0, -1.0, 0.0, 0.5, 2.0], [10.0, -10.0, 0.1, -0.1, 4.0]], np.float32)

CASES = {
    "relu": (lambda x: lm.ops.relu(x), lambda x: np.maximum(x, 0)),
    "leaky_relu": (lambda x: lm.ops.leaky_relu(x, 0.2), lambda x: np.where(x > 0, x, 0.2 * x)),
    "sigmoid": (lambda x: lm.ops.sigmoid(x), lambda x: 1 / (1 + np.exp(-x))),
    "tanh": (lambda x: lm.ops.tanh(x), np.tanh),
    "gelu": (lambda x: lm.ops.gelu(x), lambda x: 0.5 * x * (1 + ERF(x / math.sqrt(2)))),
    "gelu_tanh": (lambda x: lm.ops.gelu(x, approximate=True),
                  lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
    "softmax": (lambda x: lm.ops.softmax(x), lambda x: np.exp(x - np_logsumexp(x)[:, None])),
    "softmax_axis0": (lambda x: lm.ops.softmax(x, axis=0), lambda x: np.exp(x - np_logsumexp(x, 0)[None])),
    "log_softmax": (lambda x: lm.ops.log_softmax(x), lambda x: x - np_logsumexp(x)[:, None]),
    "logsumexp": (lambda x: lm.ops.logsumexp(x), np_logsumexp),
    "einsum": (lambda x: lm.ops.einsum("ij,kj->ik", x, x), lambda x: x @ x.T),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_numpy_reference(backend, name):
    ours, ref = CASES[name]
    out = ours(on(backend, X))
    assert lm.backend_of(out).name == backend
    np.testing.assert_allclose(to_np(out), ref(X.astype(np.float64)), rtol=2e-6, atol=2e-6)


def test_logsumexp_is_stable_for_extreme_values(backend):
    x = np.array([[1000.0, 1000.0], [-1000.0, -1000.0], [-np.inf, 0.0]], np.float32)
    np.testing.assert_allclose(to_np(lm.ops.logsumexp(on(backend, x))), [1000 + math.log(2), -1000 + math.log(2), 0],
                               rtol=1e-6)
    assert np.isfinite(to_np(lm.ops.log_softmax(on(backend, x[:2])))).all()


def test_linear_op(backend):
    x, w, b = rand(3, 4), rand(4, 2, seed=1), rand(2, seed=2)
    np.testing.assert_allclose(to_np(lm.ops.linear(on(backend, x), on(backend, w), on(backend, b))), x @ w + b,
                               rtol=1e-5, atol=1e-6)
    x3 = rand(2, 3, 4)
    np.testing.assert_allclose(to_np(lm.ops.linear(on(backend, x3), on(backend, w))), x3 @ w, rtol=1e-5, atol=1e-6)


def test_ops_agree_with_torch_functional():
    torch = pytest.importorskip("torch", reason="torch not installed")
    F = torch.nn.functional
    x = rand(4, 7) * 3
    t = torch.from_numpy(x)
    for backend in BACKENDS:
        xb = on(backend, x)
        pairs = [(lm.ops.gelu(xb), F.gelu(t)), (lm.ops.log_softmax(xb), F.log_softmax(t, -1)),
                 (lm.ops.leaky_relu(xb, 0.1), F.leaky_relu(t, 0.1)), (lm.ops.softmax(xb), F.softmax(t, -1))]
        for ours, theirs in pairs:
            np.testing.assert_allclose(to_np(ours), theirs.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend_name", GRAD_BACKENDS)
def test_relu_gradient_at_zero_is_zero(backend_name):
    lm.set_backend(backend_name)
    layer = lm.ReLU()
    _, grads = lm.value_and_grad(lambda m, x: (m(x) * m.scale).sum())(Scaled(layer), np.zeros(3, np.float32))
    np.testing.assert_array_equal(to_np(grads["scale"]), 0)
    if backend_name == "jax":
        import jax

        g = jax.jit(jax.grad(lambda v: lm.ops.relu(v).sum()))(on("jax", np.zeros(3, np.float32)))
        np.testing.assert_array_equal(to_np(g), 0)
        g = jax.grad(lambda v: lm.ops.relu(v).sum())(on("jax", np.array([0.0, 1.0], np.float32)))
        np.testing.assert_array_equal(to_np(g), [0, 1])


class Scaled(lm.Module):
    """relu(x) * scale, with x a parameter so that its gradient at x = 0 can be read."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.x = lm.Parameter((3,), init=lm.init.zeros())
        self.scale = lm.Parameter((3,), init=lm.init.ones())

    def forward(self, _):
        return self.layer(self.x)


def test_dropout_semantics(backend):
    x = on(backend, np.ones((200, 100), np.float32))
    key = None
    if backend == "jax":
        import jax

        key = jax.random.key(0)
    assert lm.ops.dropout(x, 0.3, training=False) is x
    assert lm.ops.dropout(x, 0.0, key=key) is x
    out = to_np(lm.ops.dropout(x, 0.3, key=key if key is not None else 0))
    kept = out != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(out[kept], 1 / 0.7, rtol=1e-6)
    with pytest.raises(ValueError, match="rate must be in"):
        lm.ops.dropout(x, 1.5)


def test_dropout_without_a_key_draws_one_through_lamina_random(backend):
    x = on(backend, np.ones((20, 20), np.float32))
    lm.manual_seed(3)
    first = to_np(lm.ops.dropout(x, 0.5))
    second = to_np(lm.ops.dropout(x, 0.5))
    lm.manual_seed(3)
    np.testing.assert_array_equal(to_np(lm.ops.dropout(x, 0.5)), first)  # reproducible from the seed
    assert (first != second).any()  # a fresh key each call
    with lm.random.key_scope(7):  # inside a scope (a compiled step opens one) the keys come from it
        a = to_np(lm.ops.dropout(x, 0.5))
    with lm.random.key_scope(7):
        np.testing.assert_array_equal(to_np(lm.ops.dropout(x, 0.5)), a)


def test_jax_dropout_with_a_key_is_reproducible_under_jit():
    if "jax" not in BACKENDS:
        pytest.skip("jax not installed")
    import jax

    x = on("jax", np.ones((10, 10), np.float32))
    a = lm.ops.dropout(x, 0.5, key=jax.random.key(1))
    b = jax.jit(lambda v, k: lm.ops.dropout(v, 0.5, key=k))(x, jax.random.key(1))
    np.testing.assert_array_equal(to_np(a), to_np(b))


def test_ops_reject_non_arrays():
    with pytest.raises(lm.BackendError, match="expected an array of torch, jax or numpy, got str"):
        lm.ops.relu("x")
