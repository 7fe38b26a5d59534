"""Compiled inference (issue 9, section 4): ``lm.compile`` on every backend, compiled evaluate/predict on jax."""

import numpy as np
import pytest

import lamina as lm

from conftest import BACKENDS, to_np


def net_with_batchnorm():
    return lm.Sequential(lm.Linear(4, 8), lm.BatchNorm1d(8), lm.ReLU(), lm.Linear(8, 2))


def x_of(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def eager_numpy(net, x):
    """The eval-mode forward written out in NumPy from the model's weights (an independent reference)."""
    w = {k: to_np(v).astype(np.float64) for k, v in net.state_dict().items()}
    h = x @ w["0.weight"] + w["0.bias"]
    h = (h - w["1.running_mean"]) / np.sqrt(w["1.running_var"] + 1e-5) * w["1.weight"] + w["1.bias"]
    return np.maximum(h, 0) @ w["3.weight"] + w["3.bias"]


def test_compiled_forward_equals_eager_and_sees_later_updates(backend):
    if backend == "torch":
        pytest.importorskip("torch._inductor")
    net = net_with_batchnorm()
    x = x_of(6)
    net.eval()
    fast = lm.compile(net)
    np.testing.assert_allclose(to_np(fast(x)), to_np(net(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_np(fast(x)), eager_numpy(net, x), rtol=1e-4, atol=1e-5)
    # a later update of the weights (as training or a load does) is seen by the compiled forward
    state = {k: to_np(v) * 0.5 if "num_batches" not in k else to_np(v) for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    np.testing.assert_allclose(to_np(fast(x)), eager_numpy(net, x), rtol=1e-4, atol=1e-5)


def test_numpy_compile_is_the_model_itself():
    if "numpy" not in BACKENDS:
        pytest.skip("numpy backend not selected")
    lm.set_backend("numpy")
    net = lm.Linear(3, 2)
    assert lm.compile(net) is net


def test_jax_compile_one_program_per_shape_and_no_donation():
    if "jax" not in BACKENDS:
        pytest.skip("jax not installed")
    lm.set_backend("jax")
    import jax.numpy as jnp

    net = net_with_batchnorm().eval()
    fast = lm.compile(net)
    x = jnp.asarray(x_of(6))
    for _ in range(3):
        fast(x)
    fast(x_of(6))  # the same shape from NumPy: no new program
    assert fast.compiled._cache_size() == 1
    fast(x_of(3))
    assert fast.compiled._cache_size() == 2
    weights = dict(net.state_dict())
    fast(x)
    assert not any(v.is_deleted() for v in weights.values())  # nothing the user holds is donated
    assert not x.is_deleted()


def test_jax_compile_in_training_mode_updates_batchnorm_statistics():
    if "jax" not in BACKENDS:
        pytest.skip("jax not installed")
    lm.set_backend("jax")
    net = net_with_batchnorm()
    ref = net_with_batchnorm()
    ref.load_state_dict(net.state_dict())
    x = x_of(16)
    lm.compile(net)(x)  # training mode: batch statistics, running statistics updated as eagerly
    ref(x)
    for k in ("1.running_mean", "1.running_var"):
        np.testing.assert_allclose(to_np(net.state_dict()[k]), to_np(ref.state_dict()[k]), rtol=1e-5, atol=1e-6)


def test_jax_predict_and_evaluate_run_compiled_in_eval_mode():
    if "jax" not in BACKENDS:
        pytest.skip("jax not installed")
    lm.set_backend("jax")
    net = net_with_batchnorm()
    net(x_of(16))  # training-mode call: the running statistics move away from their initial values
    traces = []

    class Spy(lm.Module):
        def forward(self, h):
            traces.append(1)  # runs only while jax traces (or eagerly)
            return h

    net.append(Spy())
    x = x_of(40, seed=1)
    want = eager_numpy(net, x)
    for _ in range(2):
        np.testing.assert_allclose(to_np(lm.predict(net, x, batch_size=16)), want, rtol=1e-4, atol=1e-5)
    # batches of 16, 16 and 8 rows: two programs, each traced once, reused by the second predict
    assert len(traces) == 2
    y = np.zeros((40, 2), np.float32)
    res = lm.evaluate(net, lm.losses.mse, (x, y), batch_size=16)
    np.testing.assert_allclose(res["loss"], (want**2).mean(), rtol=1e-4)
    assert len(traces) == 2
    assert all(m.training for m in net.modules())  # the modes are back


class Seen(lm.Module):
    """A forward that stores an input (the textbook's ``self.attention_weights``) and reads a Python number."""

    def __init__(self):
        super().__init__()
        self.a = lm.Linear(3, 1)
        self.k = 1.0

    def forward(self, x):
        self.seen = x
        return self.a(x) * self.k


def x3(shift=0.0):
    return np.arange(6, dtype=np.float32).reshape(2, 3) + shift


def test_attributes_forward_sets_are_refreshed_by_predict_and_compile(backend):
    m = Seen()
    lm.functional_call(m, {}, x3(20))
    lm.predict(m, x3(30))
    np.testing.assert_array_equal(to_np(m.seen), x3(30))  # the last call's value, as eager
    assert lm.backend_of(m.seen) is not None or backend == "numpy"
    fast = lm.compile(m)
    fast(x3(40))
    np.testing.assert_array_equal(to_np(m.seen), x3(40))
    fast(x3(50))  # the cached program: the attribute is still refreshed
    np.testing.assert_array_equal(to_np(m.seen), x3(50))


def test_predict_sees_a_changed_python_attribute(backend):
    m = Seen()
    x = x3()
    w = {k: to_np(v).astype(np.float64) for k, v in m.state_dict().items()}
    ref = x @ w["a.weight"] + w["a.bias"]
    np.testing.assert_allclose(to_np(lm.predict(m, x)), ref, rtol=1e-5)
    m.k = 5.0
    np.testing.assert_allclose(to_np(lm.predict(m, x)), 5 * ref, rtol=1e-5)
    np.testing.assert_allclose(to_np(m(x)), 5 * ref, rtol=1e-5)
    res = lm.evaluate(m, lm.losses.mse, (x, np.zeros((2, 1), np.float32)))
    np.testing.assert_allclose(res["loss"], ((5 * ref) ** 2).mean(), rtol=1e-5)
    fast = lm.compile(m)  # lm.compile reads Python values when it traces; compiling again refreshes them
    m.k = 2.0
    np.testing.assert_allclose(to_np(lm.compile(m)(x)), 2 * ref, rtol=1e-5)
    del fast


@pytest.mark.parametrize("shape", [(0, 3)])
def test_predict_on_no_rows_is_an_empty_array_of_the_output_shape(backend, shape):
    m = lm.Linear(3, 2)
    out = lm.predict(m, np.zeros(shape, np.float32))
    assert tuple(out.shape) == (0, 2)
    assert lm.backend_of(out) is lm.get_backend(backend) or backend == "numpy"
    with pytest.raises(ValueError, match="no batches"):
        lm.predict(m, [])
