"""The training rooms (lamina.training): the registry, optimizers identified by path, a user's own update
rule on every backend, all-or-nothing state loading, and no donated array that the user still holds."""

import subprocess
import sys

import numpy as np
import pytest

import lamina as lm
from lamina.training import trainer_for

from conftest import BACKENDS, GRAD_BACKENDS, rand, to_np


def test_numpy_has_no_training_room_and_says_where_to_train():
    with pytest.raises(lm.BackendError, match="numpy backend cannot train .* train on torch or jax and load the "
                                              "weights here"):
        trainer_for(lm.get_backend("numpy"))


def test_every_room_offers_the_interface(grad_backend):
    room = trainer_for(lm.get_backend(grad_backend))
    assert callable(room.make_step) and callable(room.engine)


def test_importing_lamina_and_its_training_package_imports_no_backend():
    code = ("import sys, lamina, lamina.training, lamina.train, lamina.optim; "
            "print(sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_number_first_says_the_model_comes_first():
    with pytest.raises(TypeError, match="the model or its parameters come first"):
        lm.optim.Adam(1e-2)
    with pytest.raises(TypeError, match="must be lm.Parameter"):
        lm.optim.SGD([np.zeros(3)], lr=0.1)


def test_a_parameter_given_twice_is_an_error(backend):
    layer = lm.Linear(2, 2)
    w = layer.get_parameter("weight")
    with pytest.raises(ValueError, match="given twice"):
        lm.optim.SGD([w, layer.get_parameter("bias"), w], lr=0.1)


def test_list_of_same_named_parameters_keeps_each_its_own_update(grad_backend):
    """Issue 8: entries were named by the short name, so on jax l1.weight received l2's array."""
    l1, l2 = lm.Linear(3, 2), lm.Linear(2, 1)
    net = lm.Sequential(l1, l2)
    w1, w2 = l1.get_parameter("weight"), l2.get_parameter("weight")
    opt = lm.optim.SGD([w1, w2], lr=0.1)
    assert [k for k, _ in opt.entries()] == ["0.weight", "1.weight"]
    x = np.ones((4, 3), np.float32)
    W1, b1, W2, b2 = (to_np(v).astype(np.float64) for v in (l1.weight, l1.bias, l2.weight, l2.bias))
    lm.value_and_grad(lambda m, x: (m(x) ** 2).sum())(net, x)
    opt.step()
    # by hand: out = (x W1 + b1) W2 + b2, loss = sum(out^2)
    h = x @ W1 + b1
    out = h @ W2 + b2
    d_out = 2 * out
    g2 = h.T @ d_out
    g1 = x.T @ (d_out @ W2.T)
    np.testing.assert_allclose(to_np(l1.weight), W1 - 0.1 * g1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_np(l2.weight), W2 - 0.1 * g2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_np(l1.bias), b1)  # not given: not updated
    assert to_np(net(x)).shape == (4, 1)  # the net still runs
    assert set(opt.state_dict()) == {"0.weight/step", "1.weight/step"}


def test_parameters_of_two_models_with_the_same_path_are_told_apart(grad_backend):
    a, b = lm.Linear(2, 1), lm.Linear(2, 1)
    opt = lm.optim.Adam([a.get_parameter("weight"), b.get_parameter("weight")], lr=0.1)
    assert [k for k, _ in opt.entries()] == ["weight@0", "weight@1"]


class SignSGD(lm.optim.Optimizer):
    """A user's optimizer: only slots, scalars (inherited: [lr]) and update."""

    slots = ("velocity",)

    def __init__(self, params, lr=0.01, beta=0.5):
        super().__init__(params, lr=lr, beta=beta)

    def update(self, param, grad, state, scalars, xp):
        v = self.hyper["beta"] * state["velocity"] + grad
        return param - scalars[0] * xp.sign(v), {"velocity": v}


def _hand_sign_sgd(w, b, batches, lr, beta):
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for x, y in batches:
        err = x @ w + b - y  # mse: mean(err^2)
        gw, gb = 2 * x.T @ err / err.size, 2 * err.sum(0) / err.size
        vw, vb = beta * vw + gw, beta * vb + gb
        w, b = w - lr * np.sign(vw), b - lr * np.sign(vb)
    return w, b


@pytest.mark.parametrize("how", ["opt.step", "fit"])
def test_a_user_written_optimizer_trains_on_every_backend(grad_backend, how):
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((8, 3)).astype(np.float32), rng.standard_normal((8, 1)).astype(np.float32))
               for _ in range(6)]
    net = lm.Linear(3, 1)
    w0, b0 = to_np(net.weight).astype(np.float64), to_np(net.bias).astype(np.float64)
    opt = SignSGD(net, lr=0.05)
    if how == "fit":
        lm.fit(net, lm.losses.mse, opt, batches, epochs=1, progress=False)
    else:
        b = lm.get_backend()
        for x, y in batches:
            x, y = b.from_numpy(x), b.from_numpy(y)
            _, grads = lm.value_and_grad(lambda m, x, y: lm.losses.mse(m(x), y))(net, x, y)
            opt.step(grads)
    w, b = _hand_sign_sgd(w0, b0, [(x.astype(np.float64), y.astype(np.float64)) for x, y in batches], 0.05, 0.5)
    np.testing.assert_allclose(to_np(net.weight), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_np(net.bias), b, rtol=1e-5, atol=1e-6)
    state = opt.state_dict()
    assert set(state) == {"weight/velocity", "weight/step", "bias/velocity", "bias/step"}
    assert float(to_np(state["weight/step"])) == 6


def test_load_state_dict_is_all_or_nothing(grad_backend):
    net = lm.Sequential(lm.Linear(3, 2), lm.Linear(2, 1))
    opt = lm.optim.Adam(net, lr=0.1)
    x = np.ones((4, 3), np.float32)
    _, grads = lm.value_and_grad(lambda m, x: (m(x) ** 2).sum())(net, x)
    opt.step(grads)
    before = {k: to_np(v).copy() for k, v in opt.state_dict().items()}
    bad = {k: v.copy() for k, v in before.items()}
    bad["0.weight/exp_avg"] = np.zeros((2, 3), np.float32)  # wrong shape
    bad["1.bias/exp_avg_sq"] = np.zeros((1,), np.float64)  # wrong dtype
    bad["2.weight/exp_avg"] = np.zeros((1,), np.float32)  # unknown parameter
    del bad["1.weight/step"]  # missing
    with pytest.raises(ValueError) as e:
        opt.load_state_dict(bad, steps=99)
    msg = str(e.value)
    for part in ("nothing was loaded", "'0.weight/exp_avg' has shape (2, 3)", "'1.bias/exp_avg_sq' has dtype float64",
                 "unexpected key '2.weight/exp_avg'", "missing keys ['1.weight/step']"):
        assert part in msg
    assert opt.steps == 1
    after = {k: to_np(v) for k, v in opt.state_dict().items()}
    assert set(after) == set(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    with pytest.raises(ValueError, match="steps must be a non-negative int"):
        opt.load_state_dict(before, steps=-1)


def test_state_saved_before_the_first_step_loads_and_resumes(grad_backend):
    """Issue 10: resuming from a state saved before any update failed on torch."""
    results = []
    for reload in (False, True):
        lm.manual_seed(0)
        net = lm.Linear(3, 1)
        opt = lm.optim.Adam(net, lr=0.1)
        if reload:
            opt.load_state_dict({k: to_np(v) for k, v in opt.state_dict().items()}, steps=0)
        _, grads = lm.value_and_grad(lambda m, x: (m(x) ** 2).sum())(net, np.ones((2, 3), np.float32))
        opt.step(grads)
        results.append(to_np(net.weight))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6, atol=1e-7)


# ----- jax: nothing the user holds is donated ---------------------------------------------------------
jax_only = pytest.mark.skipif("jax" not in GRAD_BACKENDS, reason="jax not installed")


def _data(n=64):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 4)).astype(np.float32), rng.standard_normal((n, 1)).astype(np.float32)


@jax_only
def test_jax_fit_keeps_a_state_dict_snapshot_valid():
    lm.set_backend("jax")
    net = lm.Sequential(lm.Linear(4, 8), lm.ReLU(), lm.Linear(8, 1))
    opt = lm.optim.Adam(net, lr=0.01)
    snap = net.state_dict()
    expected = {k: np.array(to_np(v)) for k, v in snap.items()}
    lm.fit(net, lm.losses.mse, opt, _data(), epochs=2, batch_size=8, progress=False)
    opt_snap = opt.state_dict()
    snap2 = net.state_dict()  # taken after one fit, before another
    expected2 = {k: np.array(to_np(v)) for k, v in snap2.items()}
    lm.fit(net, lm.losses.mse, opt, _data(), epochs=1, batch_size=8, progress=False)
    for k in expected:
        np.testing.assert_array_equal(to_np(snap[k]), expected[k])  # raised "Array has been deleted"
        np.testing.assert_array_equal(to_np(snap2[k]), expected2[k])
    for v in opt_snap.values():
        to_np(v)


@jax_only
def test_jax_fit_copies_only_the_values_someone_else_holds(monkeypatch):
    """Before donating, fit copies a value only where more than Lamina refers to it: after a fit, a second
    fit copies nothing; holding one weight makes that weight (and only it) copied, and it stays valid."""
    import jax

    import lamina.training.jax as room

    lm.set_backend("jax")
    copied = []
    original = room._copy_foreign

    def counting(tree, owned, host=None):  # (a call that copies nothing still sends the epoch's scalar table)
        n = sum(owned.get(id(a)) is not a for a in jax.tree_util.tree_leaves(tree))
        if n:
            copied.append(n)
        return original(tree, owned, host)

    monkeypatch.setattr(room, "_copy_foreign", counting)
    monkeypatch.setattr(room, "ADOPT_FROM_BYTES", 0)  # (a small model's values are copied: that is cheaper)
    net = lm.Sequential(lm.Linear(4, 8), lm.ReLU(), lm.Linear(8, 1))
    opt = lm.optim.Adam(net, lr=0.01)
    lm.fit(net, lm.losses.mse, opt, _data(), batch_size=8, progress=False)
    copied.clear()
    lm.fit(net, lm.losses.mse, opt, _data(), batch_size=8, progress=False)
    assert copied == []
    held = net[0].weight
    expected = np.array(held)
    lm.fit(net, lm.losses.mse, opt, _data(), batch_size=8, progress=False)
    assert copied == [1]
    np.testing.assert_array_equal(np.asarray(held), expected)
    assert not np.array_equal(to_np(net[0].weight), expected)  # the model trained on


@jax_only
def test_jax_fit_keeps_an_assigned_array_valid():
    import jax.numpy as jnp

    lm.set_backend("jax")
    net = lm.Sequential(lm.Linear(4, 8), lm.ReLU(), lm.Linear(8, 1))
    mine = jnp.ones((4, 8), jnp.float32)
    net.get_parameter("0.weight").numpy()  # values drawn: the assignment then keeps the user's array itself
    net.get_parameter("0.weight").value = mine
    lm.fit(net, lm.losses.mse, lm.optim.SGD(net, lr=0.01), _data(), epochs=1, batch_size=8, progress=False)
    np.testing.assert_array_equal(np.asarray(mine), np.ones((4, 8), np.float32))
    assert not np.array_equal(to_np(net[0].weight), np.ones((4, 8), np.float32))  # it did train


@jax_only
def test_jax_fit_keeps_a_loaded_mapping_valid():
    import jax.numpy as jnp

    lm.set_backend("jax")
    net = lm.Sequential(lm.Linear(4, 8), lm.ReLU(), lm.Linear(8, 1))
    given = {k: jnp.asarray(to_np(v)) + 1 for k, v in net.state_dict().items()}
    expected = {k: np.array(v) for k, v in given.items()}
    net.load_state_dict(given)
    opt = lm.optim.Adam(net, lr=0.01)
    opt_given = {k: jnp.asarray(to_np(v)) for k, v in opt.state_dict().items()}
    opt.load_state_dict(opt_given)
    lm.fit(net, lm.losses.mse, opt, _data(), epochs=1, batch_size=8, progress=False)
    for k in given:
        np.testing.assert_array_equal(np.asarray(given[k]), expected[k])
    for v in opt_given.values():
        np.asarray(v)


@jax_only
def test_jax_fit_groups_steps_only_where_a_step_is_fast(monkeypatch):
    import lamina.training.jax as room

    lm.set_backend("jax")
    traces = []

    def loss(out, y):
        traces.append(1)  # runs only while jax traces a program
        return lm.losses.mse(out, y)

    for threshold, programs in ((0.0, 1), (10.0, 2)):  # never fast enough: one program; always: two
        monkeypatch.setattr(room, "GROUP_BELOW_S", threshold)
        monkeypatch.setattr(room, "TRY_BELOW_S", threshold)  # no trial of a grouped call in between
        traces.clear()
        net = lm.Sequential(lm.Linear(4, 8), lm.ReLU(), lm.Linear(8, 1))
        lm.fit(net, loss, lm.optim.Adam(net), _data(320), epochs=1, batch_size=8, progress=False)
        assert len(traces) == programs


@pytest.mark.skipif(not {"torch", "jax"} <= set(BACKENDS), reason="needs torch and jax")
@pytest.mark.parametrize("src, dst", [("torch", "jax"), ("jax", "torch")])
def test_moving_the_model_carries_the_optimizer_state(src, dst):
    """Issue 10: model.to(backend=...) used to reset the optimizer's moments and step count."""
    x, y = rand(8, 3), rand(8, 1, seed=1)
    loss = lambda m, x, y: lm.losses.mse(m(x), y)  # noqa: E731

    def run(switch_after):
        lm.set_backend(src)
        lm.manual_seed(3)
        net = lm.Sequential(lm.Linear(3, 4), lm.ReLU(), lm.Linear(4, 1))
        opt = lm.optim.Adam(net, lr=0.05)
        for i in range(4):
            if i == switch_after:
                net.to(backend=dst)
            _, grads = lm.value_and_grad(loss)(net, x, y)
            opt.step(grads)
        return {k: p.numpy() for k, p in net.named_parameters()}, opt.steps

    moved, steps = run(switch_after=2)
    stayed, _ = run(switch_after=99)
    assert steps == 4
    for k in stayed:
        np.testing.assert_allclose(moved[k], stayed[k], rtol=2e-5, atol=1e-6)


def test_grouping_is_chosen_from_measured_times():
    """The compiled rooms time their first steps (the first compiles: its time is left out) and group 16
    steps per call below 1 ms a step, never from 20 ms on, and in between only where a timed grouped call
    beat single steps."""
    from lamina.training.base import Grouping

    def after(times, grouped=None):
        g = Grouping(16, 1e-3, 20e-3)
        for t in times:
            assert g.k is None
            g.single(t)
        if grouped is not None:
            assert g.trial
            g.grouped(grouped)
            assert not g.trial
        return g

    assert after([5.0, 4e-4, 9e-4, 3e-4]).k == 16 and not after([5.0, 4e-4, 9e-4, 3e-4]).trial
    assert after([5.0, 0.03, 0.05, 0.04]).k == 1 and not after([5.0, 0.03, 0.05, 0.04]).trial
    middle = [5.0, 2e-3, 3e-3, 4e-3]  # one step: 3 ms (the median of the last three)
    assert after(middle).k == 1 and after(middle).trial
    assert after(middle, grouped=16 * 2.5e-3).k == 16  # grouped: 2.5 ms a step
    assert after(middle, grouped=16 * 2.99e-3).k == 1  # within 2%: not worth a second program's memory
    assert after(middle, grouped=16 * 9e-3).k == 1  # convolutions inside a loop


def test_the_jax_protective_copy_keeps_every_bit_in_new_buffers():
    """fit's protective copy on jax (a select on a traced True, one fused kernel): the same bits as the originals,
    NaNs and signed zeros included, in buffers of their own; the host table sent in the same call arrives with
    its bits, committed to the arrays' device, and later writes to the NumPy table do not reach it."""
    jax = pytest.importorskip("jax")
    from lamina.training.jax import _copy_foreign

    arrays = [jax.numpy.asarray(np.array([np.nan, -0.0, np.inf, 1.5], np.float32)),
              jax.numpy.asarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
              jax.numpy.asarray(np.array([True, False])), jax.numpy.asarray(np.uint32(7))]
    arrays = [jax.device_put(a, jax.devices()[0]) for a in arrays]  # committed, as a model's values are
    table = np.array([[np.nan, -0.0], [1e-3, -np.inf]], np.float32)
    expected = table.copy()
    copies, sent = _copy_foreign(arrays, {}, table)
    table[:] = 5
    for a, c in zip(arrays + [expected], copies + [sent]):
        assert c.dtype == a.dtype and c.shape == a.shape
        bits = [np.asarray(v).reshape(-1).view(np.uint8) for v in (c, a)]
        np.testing.assert_array_equal(*bits)
        assert c.committed and c.devices() == arrays[0].devices()
    for a, c in zip(arrays, copies):
        assert c.unsafe_buffer_pointer() != a.unsafe_buffer_pointer()


@jax_only
@pytest.mark.parametrize("how", ["one step per call", "grouped", "a user's own loop"])
def test_jax_training_keeps_a_float16_parameter_float16(how):
    """A float16 bias under Adam (whose scalars are float32) stays float16, and so does its Adam state, as on
    torch; before, jax promoted both to float32 while ``Parameter.dtype`` still said float16 (and packed and
    unpacked steps disagreed). The values: a NumPy loop of the same Adam rule (float32 arithmetic, the bias and
    its moments rounded to float16 after every step), over the same batches."""
    lm.set_backend("jax")
    lm.manual_seed(0)
    net = lm.Linear(4, 1)
    net.ensure_built(np.zeros((1, 4), np.float32))
    w0 = to_np(net.weight).copy()
    net.bias = lm.Parameter(np.full(1, 0.25, np.float16))
    opt = lm.optim.Adam(net, lr=0.05)
    r = np.random.default_rng(0)
    x = r.normal(size=(64, 4)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.0]], np.float32) + 3).astype(np.float32)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]
    if how == "a user's own loop":
        grad = lm.value_and_grad(lambda m, xb, yb: lm.losses.mse(m(xb), yb))
        for xb, yb in batches:
            opt.step(grad(net, xb, yb)[1])
    else:
        lm.fit(net, lm.losses.mse, opt, batches, progress=False, steps_per_call=1 if how.startswith("one") else 4)
    assert net.get_parameter("bias").dtype == "float16" and to_np(net.bias).dtype == np.float16
    state = opt.state_dict()
    assert {np.asarray(state[f"bias/{s}"]).dtype for s in ("exp_avg", "exp_avg_sq")} == {np.dtype(np.float16)}
    w, b = w0.astype(np.float32), np.float16(0.25)
    m = {"w": np.zeros_like(w), "b": np.float16(0)}
    v = {"w": np.zeros_like(w), "b": np.float16(0)}
    for t, (xb, yb) in enumerate(batches, 1):
        err = xb @ w + np.float32(b) - yb
        grads = {"w": (2 / err.size * xb.T @ err).astype(np.float32), "b": np.float32(2 / err.size * err.sum())}
        s1 = np.float32(0.05 / (1 - 0.9**t))
        s2 = np.float32((1 - 0.999**t) ** 0.5)
        for k, g in grads.items():
            p = w if k == "w" else np.float32(b)
            mk = np.float32(m[k]) + np.float32(0.1) * (g - np.float32(m[k]))
            vk = np.float32(v[k]) * np.float32(0.999) + np.float32(0.001) * (g * g)
            new = p - s1 * (mk / (np.sqrt(vk) / s2 + np.float32(1e-8)))
            if k == "w":
                w, m[k], v[k] = new, mk, vk
            else:
                b, m[k], v[k] = np.float16(new), np.float16(mk), np.float16(vk)
    np.testing.assert_allclose(to_np(net.weight), w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_np(net.bias).astype(np.float32), np.float32(b), rtol=2e-3, atol=2e-3)
    assert abs(float(to_np(net.bias)[0]) - 0.25) > 0.1  # it trained
