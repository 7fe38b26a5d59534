"""functional_call and value_and_grad against independent references."""

import numpy as np
import pytest

import lamina as lm

from conftest import GRAD_BACKENDS, MyLinear, numeric_grad, rand, sum_loss, to_np


def mlp():
    return lm.Sequential(lm.Linear(4, 8), lm.Tanh(), MyLinear(8, 3), lm.TensorReduction(2, 3))


def np_forward(v, x):
    """The same model in float64 NumPy, from a {path: array} dict."""
    h = np.tanh(x @ v["0.weight"] + v["0.bias"])
    h = np.maximum(h @ v["2.weight"] + v["2.bias"], 0)
    return np.einsum("bi,ijk,bj->bk", h, v["3.weight"], h)


def host(model):
    return {k: to_np(v).astype(np.float64) for k, v in model.state_dict().items()}


def test_functional_call_uses_given_values_and_leaves_model_alone(backend):
    model = mlp()
    x = rand(5, 4)
    own = host(model)
    other = {k: v * 0.5 for k, v in own.items()}
    b = lm.get_backend(backend)
    out = lm.functional_call(model, {k: b.from_numpy(v.astype(np.float32)) for k, v in other.items()}, x)
    np.testing.assert_allclose(to_np(out), np_forward(other, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_np(model(x)), np_forward(own, x), rtol=1e-4, atol=1e-5)
    partial = lm.functional_call(model, {"3.weight": b.from_numpy(other["3.weight"].astype(np.float32))}, x)
    np.testing.assert_allclose(to_np(partial), np_forward({**own, "3.weight": other["3.weight"]}, x),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError, match="no parameter"):
        lm.functional_call(model, {"9.weight": 0}, x)


def test_functional_call_builds_a_lazy_model_first(backend):
    model = lm.Sequential(lm.Linear(3), lm.ReLU())
    out = lm.functional_call(model, {}, rand(2, 5))
    assert tuple(out.shape) == (2, 3)


def finite_difference_grads(model, x):
    v = host(model)

    def loss_of(key):
        return lambda arr: (np_forward({**v, key: arr}, x) ** 2).sum()

    return {k: numeric_grad(loss_of(k), arr) for k, arr in v.items()}


def test_value_and_grad_matches_finite_differences(grad_backend):
    model = mlp()
    model.reinitialize(bias=lm.init.constant(0.2))
    x = rand(3, 4)
    loss, grads = lm.value_and_grad(sum_loss)(model, x)
    np.testing.assert_allclose(float(to_np(loss)), (np_forward(host(model), x) ** 2).sum(), rtol=1e-4)
    fd = finite_difference_grads(model, x)
    assert set(grads) == set(fd)
    for k in fd:
        np.testing.assert_allclose(to_np(grads[k]), fd[k], rtol=2e-3, atol=2e-3, err_msg=k)
    for k, p in model.named_parameters():
        assert p.grad is grads[k]


def test_value_and_grad_with_aux(grad_backend):
    model = mlp()
    (loss, out), grads = lm.value_and_grad(lambda m, x: (sum_loss(m, x), m(x)), has_aux=True)(model, rand(2, 4))
    np.testing.assert_allclose(float(to_np(loss)), (to_np(out) ** 2).sum(), rtol=1e-5)
    assert set(grads) == {k for k, _ in model.named_parameters()}


def test_numpy_backend_has_no_gradients():
    lm.set_backend("numpy")
    with pytest.raises(lm.BackendError, match="numpy backend has no automatic differentiation"):
        lm.value_and_grad(sum_loss)(mlp(), rand(2, 4))


@pytest.mark.skipif("jax" not in GRAD_BACKENDS, reason="jax not installed")
def test_functional_call_under_jax_jit_grad_and_vmap():
    import jax

    lm.set_backend("jax")
    model = mlp()
    x = rand(6, 4)
    params = model.state_dict()

    def loss(p, xb):
        return (lm.functional_call(model, p, xb) ** 2).sum()

    eager = float(loss(params, x))
    np.testing.assert_allclose(float(jax.jit(loss)(params, x)), eager, rtol=1e-5)
    g = jax.jit(jax.grad(loss))(params, x)
    _, ref = lm.value_and_grad(sum_loss)(model, x)
    for k in ref:
        np.testing.assert_allclose(to_np(g[k]), to_np(ref[k]), rtol=1e-4, atol=1e-5)
    per_example = jax.vmap(lambda xb: lm.functional_call(model, params, xb[None])[0])(x)
    np.testing.assert_allclose(to_np(per_example), to_np(model(x)), rtol=1e-5, atol=1e-6)
    assert all(type(v).__name__ == "ArrayImpl" for v in model.state_dict().values())  # no tracer leaked


@pytest.mark.skipif("torch" not in GRAD_BACKENDS, reason="torch not installed")
def test_functional_call_under_torch_func():
    import torch

    lm.set_backend("torch")
    model = mlp()
    x = torch.from_numpy(rand(3, 4))
    params = {k: v.detach() for k, v in model.state_dict().items()}
    g = torch.func.grad(lambda p: (lm.functional_call(model, p, x) ** 2).sum())(params)
    _, ref = lm.value_and_grad(sum_loss)(model, x)
    for k in ref:
        np.testing.assert_allclose(to_np(g[k]), to_np(ref[k]), rtol=1e-5, atol=1e-6)
