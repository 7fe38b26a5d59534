"""lm.value_and_grad compiled on jax (the default there) against the eager path, NumPy and a hand-written jax
loop: the same losses, gradients, buffer updates and training trajectories; one trace per signature."""

import copy

import numpy as np
import pytest

import lamina as lm

from conftest import GRAD_BACKENDS, rand, to_np

pytestmark = pytest.mark.skipif("jax" not in GRAD_BACKENDS, reason="jax not installed (or not selected)")


@pytest.fixture(autouse=True)
def _jax():
    lm.set_backend("jax")
    lm.manual_seed(0)


def twin(model):
    """A second model with the first one's structure and values (so one runs compiled, one eager)."""
    other = copy.deepcopy(model)
    other.load_state_dict(model.state_dict())
    return other


def both(fn, **kw):
    """``fn`` as a compiled and as an eager value_and_grad."""
    return lm.value_and_grad(fn, **kw), lm.value_and_grad(fn, compile=False, **kw)


def assert_same(a, b, tol=1e-6):
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k], tol)
    elif isinstance(a, tuple | list):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v, tol)
    else:
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=tol, atol=tol)


class Counted:
    """A loss function that counts how often it runs: under jax.jit, once per trace (plus one eager run on
    the first call where the model has not been called yet: value_and_grad builds it by running fn)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def mse(m, x, y):
    return lm.losses.mse(m(x), y)


def test_batchnorm_model_matches_eager_and_updates_running_stats_the_same():
    model = lm.Sequential(lm.Linear(5, 6), lm.BatchNorm1d(6), lm.ReLU(), lm.Linear(6, 2))
    other = twin(model)
    compiled, eager = both(mse)
    x, y = rand(8, 5), rand(8, 2, seed=1)
    for _ in range(3):  # the stats move on each call
        lc, gc = compiled(model, x, y)
        le, ge = eager(other, x, y)
        assert_same(lc, le)
        assert_same(gc, ge)
        assert_same(model.state_dict(), other.state_dict())
    assert int(to_np(model[1].num_batches_tracked)) == 3
    np.testing.assert_allclose(to_np(model[1].running_mean), to_np(other[1].running_mean), atol=1e-7)
    for k, p in model.named_parameters():
        assert p.grad is gc[k]
    with model.mode(False), other.mode(False):  # eval mode: another program, the running stats used
        assert_same(compiled(model, x, y), eager(other, x, y))
    assert int(to_np(model[1].num_batches_tracked)) == 3


def test_dropout_draws_a_fresh_mask_per_call_reproducible_under_manual_seed():
    """The masks come from one fresh host seed per call (lm.random.key_scope, as fit's compiled step), so
    they differ from the eager path's masks (documented) but repeat under lm.manual_seed as those do."""
    model = lm.Sequential(lm.Linear(4, 64), lm.Dropout(0.5))
    x = rand(3, 4)
    g = lm.value_and_grad(lambda m, v: ((o := m(v)).sum(), o), has_aux=True)
    (_, out), _ = g(model, x)
    (_, out2), _ = g(model, x)
    assert 0.3 < (to_np(out) != 0).mean() < 0.7
    assert (to_np(out2) != to_np(out)).any()  # a fresh seed per call
    lm.manual_seed(7)
    first = g(model, x)
    lm.manual_seed(7)
    assert_same(g(model, x), first, tol=0)
    with model.mode(False):  # no draws in eval mode: the output is the linear layer's
        (_, out), _ = g(model, x)
    np.testing.assert_allclose(to_np(out), x @ to_np(model[0].weight) + to_np(model[0].bias), rtol=1e-5, atol=1e-6)
    (_, out3), _ = g(model, x)  # back in training mode: masks again
    assert (to_np(out3) == 0).any()


def test_dropout_gradient_against_numpy():
    model = lm.Sequential(lm.Linear(4, 32), lm.Dropout(0.25))
    x = rand(5, 4)
    (loss, out), grads = lm.value_and_grad(lambda m, v: (((o := m(v)) * o).sum(), o), has_aux=True)(model, x)
    w, b = to_np(model[0].weight), to_np(model[0].bias)
    h = x @ w + b
    o = to_np(out)
    scale = np.where(o != 0, o / h, 0.0)  # mask / (1 - rate), read from the output
    np.testing.assert_allclose(scale[o != 0], 1 / 0.75, rtol=1e-5)
    np.testing.assert_allclose(float(to_np(loss)), (o * o).sum(), rtol=1e-5)
    d_h = 2 * o * scale
    np.testing.assert_allclose(to_np(grads["0.weight"]), x.T @ d_h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_np(grads["0.bias"]), d_h.sum(0), rtol=1e-4, atol=1e-5)


def test_tied_weights_appear_once_with_the_summed_gradient():
    shared = lm.Linear(4, 4)
    model = lm.Sequential(shared, lm.Tanh(), shared)
    other = twin(model)
    compiled, eager = both(lambda m, x: (m(x) ** 2).sum())
    x = rand(3, 4)
    lc, gc = compiled(model, x)
    le, ge = eager(other, x)
    assert list(gc) == ["0.weight", "0.bias"]
    assert_same((lc, gc), (le, ge))
    # NumPy: d/dW of sum(tanh(x W + b) W + b)^2 through both uses
    w, b = to_np(model[0].weight), to_np(model[0].bias)
    h = np.tanh(x @ w + b)
    out = h @ w + b
    d_out = 2 * out
    d_pre = (d_out @ w.T) * (1 - h * h)
    np.testing.assert_allclose(to_np(gc["0.weight"]), h.T @ d_out + x.T @ d_pre, rtol=1e-4, atol=1e-5)


def test_has_aux_kwargs_and_a_static_python_int():
    model = lm.Linear(6, 4)
    model(rand(1, 6))  # built: the counts below are traces only
    other = twin(model)

    def fn(m, x, k, *, target, scale=1.0):
        out = m(x)[:, :k] * scale  # k decides a shape: it must be static
        return lm.losses.mse(out, target[:, :k]), {"out": out, "k": k}

    counted = Counted(fn)
    compiled = lm.value_and_grad(counted, has_aux=True)
    eager = lm.value_and_grad(fn, has_aux=True, compile=False)
    x, t = rand(5, 6), rand(5, 4, seed=2)
    for k in (2, 3, 2):
        (lc, aux_c), gc = compiled(model, x, k, target=t, scale=0.5)
        (le, aux_e), ge = eager(other, x, k, target=t, scale=0.5)
        assert_same((lc, aux_c["out"], gc), (le, aux_e["out"], ge))
        assert tuple(aux_c["out"].shape) == (5, k)
        ref = (x @ to_np(model.weight) + to_np(model.bias))[:, :k] * 0.5
        np.testing.assert_allclose(float(to_np(lc)), ((ref - t[:, :k]) ** 2).mean(), rtol=1e-5)
    assert counted.calls == 2  # one trace per value of k; the third call reused the first program


def test_a_new_input_shape_compiles_again_with_the_right_values():
    model = lm.Linear(3, 2)
    model(rand(1, 3))
    other = twin(model)
    counted = Counted(lambda m, x: (m(x) ** 2).sum())
    compiled = lm.value_and_grad(counted)
    eager = lm.value_and_grad(lambda m, x: (m(x) ** 2).sum(), compile=False)
    for n in (4, 7, 4, 7):
        assert_same(compiled(model, rand(n, 3)), eager(other, rand(n, 3)))
    assert counted.calls == 2


def test_updated_parameters_are_seen_without_compiling_again():
    model = lm.Sequential(lm.Linear(3, 4), lm.ReLU(), lm.Linear(4, 1))
    model[2].get_parameter("bias").trainable = False  # a frozen value is an argument too
    x, y = rand(6, 3), rand(6, 1, seed=3)
    model(x)
    counted = Counted(mse)
    compiled = lm.value_and_grad(counted)
    eager = lm.value_and_grad(mse, compile=False)
    compiled(model, x, y)
    for i in range(3):
        model[0].get_parameter("weight").value = to_np(model[0].weight) * 0.5 + i
        model[2].get_parameter("bias").value = np.full((1,), float(i), np.float32)
        assert_same(compiled(model, x, y), eager(model, x, y))
    assert counted.calls == 1


def test_a_changed_trainable_flag_compiles_again():
    model = lm.Sequential(lm.Linear(3, 4), lm.Tanh(), lm.Linear(4, 2))
    x = rand(5, 3)
    model(x)
    counted = Counted(lambda m, x: (m(x) ** 2).sum())
    compiled = lm.value_and_grad(counted)
    eager = lm.value_and_grad(lambda m, x: (m(x) ** 2).sum(), compile=False)
    _, before = compiled(model, x)
    model[0].get_parameter("weight").trainable = False
    lc, gc = compiled(model, x)
    assert "0.weight" not in gc and set(gc) == {"0.bias", "2.weight", "2.bias"}
    assert_same((lc, gc), eager(model, x))
    assert_same(gc["2.weight"], before["2.weight"])
    assert counted.calls == 2
    model[0].get_parameter("weight").trainable = True
    _, again = compiled(model, x)
    assert list(again) == list(before)


def test_a_changed_python_attribute_compiles_again():
    class Scaled(lm.Module):
        def __init__(self):
            super().__init__()
            self.lin = lm.Linear(3, 2)
            self.k = 2.0

        def forward(self, x):
            return self.lin(x) * self.k

    model = Scaled()
    x = rand(4, 3)
    model(x)
    counted = Counted(lambda m, x: m(x).sum())
    compiled = lm.value_and_grad(counted)
    _, g2 = compiled(model, x)
    model.k = 3.0
    _, g3 = compiled(model, x)
    np.testing.assert_allclose(to_np(g3["lin.bias"]), np.full(2, 12.0), rtol=1e-6)
    np.testing.assert_allclose(to_np(g2["lin.bias"]), np.full(2, 8.0), rtol=1e-6)
    assert counted.calls == 2


def test_attributes_forward_assigns_come_out_concrete():
    class Keeps(lm.Module):
        def __init__(self):
            super().__init__()
            self.lin = lm.Linear(3, 2)

        def forward(self, x):
            self.last = self.lin(x)
            return self.last

    model = Keeps()
    x = rand(4, 3)
    compiled = lm.value_and_grad(lambda m, v: m(v).sum())
    for scale in (1.0, 2.0):
        compiled(model, x * scale)
        assert type(model.last).__name__ == "ArrayImpl"
        np.testing.assert_allclose(to_np(model.last), scale * x @ to_np(model.lin.weight) + to_np(model.lin.bias),
                                   rtol=1e-5, atol=1e-6)


def test_a_lazy_model_builds_on_the_first_compiled_call():
    model = lm.Sequential(lm.Linear(4), lm.ReLU(), lm.Linear(1))
    x, y = rand(6, 3), rand(6, 1)
    loss, grads = lm.value_and_grad(mse)(model, x, y)
    assert tuple(grads["0.weight"].shape) == (3, 4)
    h = np.maximum(x @ to_np(model[0].weight) + to_np(model[0].bias), 0)
    np.testing.assert_allclose(float(to_np(loss)), ((h @ to_np(model[2].weight) + to_np(model[2].bias) - y) ** 2
                                                    ).mean(), rtol=1e-5)


def test_untraceable_fn_raises_a_clear_error_and_runs_with_compile_false():
    """Reading the value of an input works eagerly (only the parameters are traced there) but not compiled."""
    model = lm.Linear(3, 1)
    x = rand(4, 3)

    class Branchy(lm.Module):
        def __init__(self):
            super().__init__()
            self.lin = lm.Linear(3, 1)

        def forward(self, v):
            return self.lin(v) if v.sum() > 0 else -self.lin(v)  # Python control flow on an array value

    for net, fn in ((model, lambda m, v: m(v).sum() * float(np.abs(v).max())),  # float()
                    (Branchy(), lambda m, v: m(v).sum()),
                    (model, lambda m, v: m(np.asarray(v) * 2).sum())):  # np.asarray()
        with pytest.raises(lm.BackendError, match="compile=False") as info:
            lm.value_and_grad(fn)(net, x)
        assert "compiles fn on the jax backend" in str(info.value)
        assert info.value.__cause__ is not None and "jax" in type(info.value.__cause__).__module__
        loss, grads = lm.value_and_grad(fn, compile=False)(net, x)  # eager: fine
        assert set(grads) == {k for k, _ in net.named_parameters()}


def test_unhashable_non_array_argument_is_a_type_error_naming_it():
    model = lm.Linear(3, 1)
    g = lm.value_and_grad(lambda m, x, opts: m(x).sum())
    with pytest.raises(TypeError, match=r"args\[1\]\['opts'\].*unhashable set.*compile=False"):
        g(model, rand(2, 3), {"opts": {1, 2}})
    aux = lm.value_and_grad(lambda m, x: (m(x).sum(), "text"), has_aux=True)
    with pytest.raises(TypeError, match="aux is a str.*compile=False"):
        aux(model, rand(2, 3))
    # eager accepts both
    lm.value_and_grad(lambda m, x, opts: m(x).sum(), compile=False)(model, rand(2, 3), {"opts": {1, 2}})


@pytest.mark.skipif("torch" not in GRAD_BACKENDS, reason="torch not installed")
def test_compile_true_needs_a_backend_that_compiles_it():
    lm.set_backend("torch")
    model = lm.Linear(3, 1)
    model(rand(1, 3))
    with pytest.raises(lm.BackendError, match="does not compile"):
        lm.value_and_grad(lambda m, x: m(x).sum(), compile=True)(model, rand(2, 3))
    counted = Counted(lambda m, x: m(x).sum())
    g = lm.value_and_grad(counted)  # the default on torch: eager, fn runs every call
    g(model, rand(2, 3))
    g(model, rand(2, 3))
    assert counted.calls == 2


def test_fifty_adam_steps_compiled_eager_and_hand_written_jax_agree():
    import jax
    import jax.numpy as jnp

    model = lm.Sequential(lm.Linear(5, 16), lm.ReLU(), lm.Linear(16, 3))
    other = twin(model)
    start = {k: to_np(v) for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32))
               for _ in range(50)]
    compiled, eager = both(mse)
    opt_c, opt_e = lm.optim.Adam(model, lr=1e-2), lm.optim.Adam(other, lr=1e-2)
    held_w = model[0].weight  # a value the user holds: never invalidated
    for xb, yb in batches:
        _, gc = compiled(model, xb, yb)
        opt_c.step(gc)
        _, ge = eager(other, xb, yb)
        opt_e.step(ge)
    np.testing.assert_allclose(to_np(held_w), start["0.weight"])
    np.testing.assert_allclose(to_np(gc["0.weight"]), to_np(ge["0.weight"]), rtol=1e-4, atol=1e-6)  # still readable

    def loss(p, xb, yb):
        h = jnp.maximum(xb @ p["0.weight"] + p["0.bias"], 0)
        return jnp.mean((h @ p["2.weight"] + p["2.bias"] - yb) ** 2)

    @jax.jit
    def step(p, m, v, t, xb, yb, b1=0.9, b2=0.999, lr=1e-2, eps=1e-8):  # torch's Adam
        g = jax.grad(loss)(p, xb, yb)
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        p = jax.tree_util.tree_map(lambda p, m, v: p - lr / c1 * m / (jnp.sqrt(v) / jnp.sqrt(c2) + eps), p, m, v)
        return p, m, v

    p = {k: jnp.asarray(v) for k, v in start.items()}
    m = jax.tree_util.tree_map(jnp.zeros_like, p)
    v = jax.tree_util.tree_map(jnp.zeros_like, p)
    for t, (xb, yb) in enumerate(batches, 1):
        p, m, v = step(p, m, v, t, xb, yb)
    for k in start:
        np.testing.assert_allclose(to_np(model.state_dict()[k]), to_np(other.state_dict()[k]), rtol=1e-6,
                                   atol=1e-6, err_msg=k)
        np.testing.assert_allclose(to_np(model.state_dict()[k]), np.asarray(p[k]), rtol=1e-5, atol=1e-5,
                                   err_msg=k)
    # the optimizer state a user took is a copy: later steps (which update the engine's own in place) leave it
    saved = opt_c.state_dict()
    before = {k: to_np(a).copy() for k, a in saved.items()}
    _, gc = compiled(model, *batches[0])
    opt_c.step(gc)
    assert_same({k: to_np(a) for k, a in saved.items()}, before, tol=0)


def test_a_float_argument_is_static_and_many_programs_warn():
    model = lm.Linear(2, 1)
    x = rand(3, 2)
    model(x)
    counted = Counted(lambda m, v, scale: (m(v) * scale).sum())
    g = lm.value_and_grad(counted)
    with pytest.warns(RuntimeWarning, match="compiled fn 20 times.*np.float32"):
        for i in range(20):
            _, grads = g(model, x, float(i))
            np.testing.assert_allclose(to_np(grads["bias"]), [3.0 * i], rtol=1e-6)
    assert counted.calls == 20
    for i in range(3):  # as an array, the number is traced: one more program for all values
        _, grads = g(model, x, np.float32(i + 0.5))
        np.testing.assert_allclose(to_np(grads["bias"]), [3.0 * (i + 0.5)], rtol=1e-6)
    assert counted.calls == 21
