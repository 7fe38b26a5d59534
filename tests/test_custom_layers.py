"""The seed section, cell by cell, on every backend, plus both exercises."""

import itertools

import numpy as np
import pytest

import lamina as lm

from conftest import CenteredLayer, MyDense, MyLinear, numeric_grad, rand, sum_loss, to_np


def test_centered_layer_subtracts_the_mean_of_all_elements(backend):
    out = CenteredLayer()(np.array([1.0, 2, 3, 4, 5], dtype=np.float32))
    assert lm.backend_of(out).name == backend
    np.testing.assert_allclose(to_np(out), [-2, -1, 0, 1, 2])
    x = rand(3, 4)
    np.testing.assert_allclose(to_np(CenteredLayer()(x)), x - x.mean(), atol=1e-6)


def test_centered_after_lazy_linear_has_zero_mean(backend):
    net = lm.Sequential(lm.Linear(128), CenteredLayer())
    Y = net(np.random.default_rng(1).random((4, 8)).astype("float32"))
    assert lm.backend_of(Y).name == backend
    assert tuple(Y.shape) == (4, 128)
    assert abs(float(to_np(Y).mean())) < 1e-6
    assert net[0].get_parameter("weight").shape == (8, 128)


def test_mylinear_parameters_visible_after_construction(backend):
    linear = MyLinear(5, 3)
    assert tuple(linear.weight.shape) == (5, 3)
    assert tuple(linear.bias.shape) == (3,)
    assert lm.backend_of(linear.weight).name == backend
    x = rand(2, 5)
    expected = np.maximum(x @ to_np(linear.weight) + to_np(linear.bias), 0)
    np.testing.assert_allclose(to_np(linear(x)), expected, rtol=1e-5, atol=1e-6)


def test_gradients_reach_mylinear_parameters(grad_backend):
    layer = MyLinear(5, 3)
    layer.reinitialize(bias=lm.init.constant(0.5))  # keep units active so every gradient is nonzero
    x = rand(4, 5)
    _, grads = lm.value_and_grad(sum_loss)(layer, x)
    W, b = to_np(layer.weight).astype(np.float64), to_np(layer.bias).astype(np.float64)
    h = x @ W + b
    y = np.maximum(h, 0)
    dh = 2 * y * (h > 0)  # hand-derived gradient of sum(relu(xW+b)^2)
    np.testing.assert_allclose(to_np(grads["weight"]), x.T @ dh, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_np(grads["bias"]), dh.sum(0), rtol=1e-4, atol=1e-4)
    assert np.abs(to_np(grads["weight"])).sum() > 0


def test_lazy_mydense_with_build_hook(backend):
    dense = MyDense(3)
    with pytest.raises(AttributeError):
        _ = dense.weight  # not declared until build
    y = dense(rand(2, 5))
    assert tuple(y.shape) == (2, 3)
    assert tuple(dense.weight.shape) == (5, 3)
    np.testing.assert_array_equal(to_np(dense.bias), 0)


def test_custom_layers_compose_like_builtins(backend):
    net = lm.Sequential(MyLinear(64, 8), MyLinear(8, 1))
    x = rand(2, 64)
    y = net(x)
    assert tuple(y.shape) == (2, 1)
    h = np.maximum(x @ to_np(net[0].weight) + to_np(net[0].bias), 0)
    ref = np.maximum(h @ to_np(net[1].weight) + to_np(net[1].bias), 0)
    np.testing.assert_allclose(to_np(y), ref, rtol=1e-4, atol=1e-4)


def test_tensor_reduction_matches_triple_loop(backend):
    layer = lm.TensorReduction(3)
    x = rand(4, 5)
    y = to_np(layer(x))
    W = to_np(layer.weight)
    assert W.shape == (5, 5, 3)
    ref = np.zeros((4, 3))
    for b, k, i, j in itertools.product(range(4), range(3), range(5), range(5)):
        ref[b, k] += W[i, j, k] * x[b, i] * x[b, j]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_tensor_reduction_gradient_matches_finite_differences(grad_backend):
    layer = lm.TensorReduction(2, 3)
    x = rand(2, 3)
    _, grads = lm.value_and_grad(sum_loss)(layer, x)
    W = to_np(layer.weight).astype(np.float64)

    def loss(Wv):
        return (np.einsum("bi,ijk,bj->bk", x.astype(np.float64), Wv, x.astype(np.float64)) ** 2).sum()

    np.testing.assert_allclose(to_np(grads["weight"]), numeric_grad(loss, W), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n", [8, 5, 1, 2])
def test_leading_fourier_matches_numpy_fft(backend, n):
    x = rand(3, n)
    out = lm.LeadingFourier()(x)
    ref = np.fft.fft(x.astype(np.float64))[..., : (n + 1) // 2]
    assert to_np(out).dtype == np.complex64
    assert to_np(out).shape == (3, (n + 1) // 2)
    np.testing.assert_allclose(to_np(out), ref, rtol=1e-5, atol=1e-5)
    split = to_np(lm.LeadingFourier(split=True)(x))
    np.testing.assert_allclose(split, np.concatenate([ref.real, ref.imag], -1), rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_leading_fourier(grad_backend):
    # loss = sum over leading coefficients of |X_k|^2; check against finite differences in float64
    net = lm.Sequential(lm.Linear(6, 6), lm.LeadingFourier(split=True))
    x = rand(2, 6)
    _, grads = lm.value_and_grad(sum_loss)(net, x)
    W, b = to_np(net[0].weight).astype(np.float64), to_np(net[0].bias).astype(np.float64)

    def loss(Wv):
        c = np.fft.fft(x @ Wv + b)[..., :3]
        return (c.real**2 + c.imag**2).sum()

    np.testing.assert_allclose(to_np(grads["0.weight"]), numeric_grad(loss, W), rtol=1e-3, atol=1e-3)
