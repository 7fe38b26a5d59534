"""Optimizers against torch.optim on the same gradients, frozen and tied parameters, state and schedules."""

import numpy as np
import pytest

import lamina as lm

from conftest import GRAD_BACKENDS, rand, sum_loss, to_np

torch = pytest.importorskip("torch", reason="the reference is torch.optim")

CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
]


@pytest.mark.parametrize(("name", "hyper"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_updates_match_torch_optim_over_100_steps(grad_backend, name, hyper):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((6, 4)).astype(np.float32)
    grads = [rng.standard_normal((6, 4)).astype(np.float32) for _ in range(100)]
    t = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    ref = getattr(torch.optim, name)([t], **hyper)
    p = lm.Parameter(value=w0)
    opt = getattr(lm.optim, name)([p], **hyper)
    b = lm.get_backend()
    for g in grads:
        before_ref, before = t.detach().numpy().copy(), p.numpy().copy()
        t.grad = torch.from_numpy(g)
        ref.step()
        opt.step({"0": b.from_numpy(g)})
        # each update matches within 1e-6 (torch: bit for bit, except Adam/AdamW, which run torch's fused
        # kernel where it exists: float32 rounding apart from the default kernel)
        ours, theirs = p.numpy() - before, t.detach().numpy() - before_ref
        exact = grad_backend == "torch" and name == "SGD"
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=0 if exact else 1e-6)
    np.testing.assert_allclose(p.numpy(), t.detach().numpy(), rtol=1e-6, atol=1e-6)
    assert opt.steps == 100


def test_frozen_parameters_are_never_updated_and_tied_once(grad_backend):
    shared = lm.Linear(4, 4)
    net = lm.Sequential(lm.Linear(3, 4), shared, lm.Tanh(), shared)
    net.get_parameter("0.bias").trainable = False
    frozen = to_np(net[0].bias).copy()
    opt = lm.optim.SGD(net, lr=0.1)
    assert [k for k, _ in opt.entries()] == ["0.weight", "1.weight", "1.bias"]
    x = rand(5, 3)
    before = to_np(net[1].weight).copy()
    _, grads = lm.value_and_grad(sum_loss)(net, x)
    opt.step(grads)
    np.testing.assert_array_equal(to_np(net[0].bias), frozen)
    # tied: one update with the summed gradient, not two
    np.testing.assert_allclose(to_np(net[1].weight), before - 0.1 * to_np(grads["1.weight"]), rtol=1e-6, atol=1e-7)
    assert net[3].weight is net[1].weight


def test_learning_rate_schedule_is_called_with_the_step(grad_backend):
    p = lm.Parameter(value=np.zeros(1, np.float32))
    seen = []

    def schedule(step):
        seen.append(step)
        return 1.0 / (step + 1)

    opt = lm.optim.SGD([p], lr=99.0, schedule=schedule)
    b = lm.get_backend()
    for _ in range(3):
        opt.step({"0": b.from_numpy(np.ones(1, np.float32))})
    assert seen == [0, 1, 2]
    np.testing.assert_allclose(p.numpy(), [-(1 + 1 / 2 + 1 / 3)], rtol=1e-6)


def test_optimizer_created_before_the_dry_run_still_works(grad_backend):
    net = lm.Sequential(lm.Linear(4), lm.ReLU(), lm.Linear(1))
    opt = lm.optim.Adam(net, lr=0.01)
    net.build((None, 3))
    before = to_np(net[0].weight).copy()
    _, grads = lm.value_and_grad(sum_loss)(net, rand(2, 3))
    opt.step(grads)
    assert not np.allclose(before, to_np(net[0].weight))


def test_state_dict_round_trip_and_cross_backend_state(tmp_path):
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((3, 2)).astype(np.float32) for _ in range(10)]
    results = {}
    for backend in GRAD_BACKENDS:
        lm.set_backend(backend)
        p = lm.Parameter(value=np.ones((3, 2), np.float32))
        opt = lm.optim.Adam([p], lr=0.1)
        b = lm.get_backend()
        for g in grads[:5]:
            opt.step({"0": b.from_numpy(g)})
        state = {k: to_np(v) for k, v in opt.state_dict().items()}
        assert set(state) == {"0/step", "0/exp_avg", "0/exp_avg_sq"} and float(state["0/step"]) == 5
        results[backend] = state
    first, *others = results.values()  # same names and values on every backend: the state is portable
    for other in others:
        for k in first:
            np.testing.assert_allclose(other[k], first[k], rtol=1e-5, atol=1e-7)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="lr must be a non-negative number"):
        lm.optim.SGD([], lr=-1)
    with pytest.raises(ValueError, match="nesterov=True needs momentum"):
        lm.optim.SGD([], nesterov=True)
    with pytest.raises(ValueError, match="no trainable parameters"):
        lm.optim.SGD([], lr=0.1).step({})


def test_step_without_gradients_says_how_to_get_them(grad_backend):
    opt = lm.optim.SGD(lm.Linear(2, 2), lr=0.1)
    with pytest.raises(ValueError, match=r"no gradient for \['weight', 'bias'\]"):
        opt.step()


def test_scalar_table_is_the_per_step_scalars_stacked():
    """Compiled steps read their scalars from a table made for many updates at once; it must hold exactly
    the numbers that ``scalars`` gives one update at a time (so a resumed or grouped run follows the same
    trajectory), for the built-in optimizers and for a user's own (which only defines ``scalars``)."""

    class Scaled(lm.optim.Optimizer):
        slots = ()

        def scalars(self, lr, step):
            return np.array([lr, lr / step], np.float32)

        def update(self, param, grad, state, scalars, xp):
            return param - scalars[1] * grad, {}

    class Plain(lm.optim.Optimizer):
        slots = ()

        def update(self, param, grad, state, scalars, xp):
            return param - scalars[0] * grad, {}

    class Frozen(lm.optim.Adam):  # Adam's update, its own scalars: the table must use them
        def scalars(self, lr, step):
            return np.array([0.0, 0.0, 1.0, 1.0], np.float32)

    lm.set_backend("numpy")
    net = lm.Linear(2, 2)
    lrs = list(np.linspace(1e-4, 3e-2, 3000))
    for opt in (lm.optim.Adam(net, lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1), lm.optim.AdamW(net),
                lm.optim.SGD(net, momentum=0.9), Scaled(net, lr=0.1), Plain(net, lr=0.1), Frozen(net)):
        for first in (1, 98765):
            table = opt.scalar_table(lrs, first)
            ref = np.stack([opt.scalars(lr, first + i) for i, lr in enumerate(lrs)])
            assert table.dtype == np.float32
            np.testing.assert_array_equal(table, ref, err_msg=type(opt).__name__)
