"""Regression tests from an adversarial review of the column-major ``Linear`` weights on torch (``Parameter(order=)``,
``backends/torch.py`` ``make_parameter``, the optimizer engine's transposed views in ``training/torch.py``).
References: torch.nn + torch.optim."""

import copy

import numpy as np
import pytest

import lamina as lm

torch = pytest.importorskip("torch", reason="memory order is a torch matter (strided tensors)")
F = torch.nn.functional


@pytest.fixture(autouse=True)
def _on_torch():
    lm.set_backend("torch")


def column_major(t) -> bool:
    return tuple(t.stride()) == (1, t.shape[0])


def _data(rows=32, width=128, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, width)).astype(np.float32), rng.integers(0, classes, rows)


def _twins(seed=1):
    """A Lamina MLP whose first weight (128 x 64, 8,192 elements) is column-major by default, and torch.nn's
    twin with the same weights."""
    lm.manual_seed(seed)
    net = lm.Sequential(lm.Linear(128, 64), lm.ReLU(), lm.Linear(64, 10))
    ref = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        for i in (0, 2):
            ref[i].weight.copy_(torch.from_numpy(net.get_parameter(f"{i}.weight").numpy().T.copy()))
            ref[i].bias.copy_(torch.from_numpy(net.get_parameter(f"{i}.bias").numpy()))
    return net, ref


def _assert_same(net, ref, atol=1e-6):
    for i in (0, 2):
        np.testing.assert_allclose(net.get_parameter(f"{i}.weight").numpy(), ref[i].weight.detach().numpy().T,
                                   rtol=1e-5, atol=atol, err_msg=f"{i}.weight")
        np.testing.assert_allclose(net.get_parameter(f"{i}.bias").numpy(), ref[i].bias.detach().numpy(),
                                   rtol=1e-5, atol=atol, err_msg=f"{i}.bias")


@pytest.mark.parametrize("make, make_ref", [
    (lambda m: lm.optim.Adam(m, lr=0.01), lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=False)),
    (lambda m: lm.optim.SGD(m, lr=0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
], ids=["adam", "sgd-momentum"])
def test_a_deepcopy_of_model_and_optimizer_together_keeps_training_the_copy(make, make_ref):
    """``copy.deepcopy((model, opt))`` (a snapshot to branch training from): the copied optimizer must update the
    copied model. It steps a transposed view of each column-major weight (``_TorchOptim.stepped``); deepcopy
    copies the ``nn.Parameter`` by ``clone()`` and the view through its storage, into two separate memories, and
    the copy's updates of its weights go into memory no model holds (it worked before the change)."""
    x, y = _data()
    net, ref = _twins()
    assert column_major(net[0].weight)
    opt, ref_opt = make(net), make_ref(list(ref.parameters()))
    loss = lambda m, xb, yb: lm.losses.cross_entropy(m(xb), yb)  # noqa: E731

    def ref_step(i):
        ref_opt.zero_grad()
        F.cross_entropy(ref(torch.from_numpy(x[i:i + 8])), torch.from_numpy(y[i:i + 8])).backward()
        ref_opt.step()

    for i in (0, 8):
        opt.step(lm.value_and_grad(loss)(net, torch.from_numpy(x[i:i + 8]), torch.from_numpy(y[i:i + 8]))[1])
        ref_step(i)
    twin, twin_opt = copy.deepcopy((net, opt))
    for i in (16, 24):
        twin_opt.step(lm.value_and_grad(loss)(twin, torch.from_numpy(x[i:i + 8]), torch.from_numpy(y[i:i + 8]))[1])
        ref_step(i)
    _assert_same(twin, ref)


def test_a_gradient_of_another_shape_is_refused_not_broadcast():
    """``opt.step(grads)`` with a gradient whose shape is not the parameter's (a mixed-up key: the bias's
    gradient under the weight's name) raised before the change (torch: "attempting to assign a gradient of size
    [64] to a tensor of size [128, 64]"); the engine's re-layout ``torch.empty_like(t).copy_(g)`` broadcasts it
    instead, and every row of the weight takes the bias's update without a word. It happens to every parameter
    whose gradient's strides differ from its own, column-major or not."""
    for sizes in ((128, 64), (8, 16)):  # column-major and row-major weights
        lin = lm.Linear(*sizes)
        lin(np.zeros((1, sizes[0]), np.float32))
        before = lin.get_parameter("weight").numpy().copy()
        opt = lm.optim.SGD(lin, lr=0.1)
        with pytest.raises((ValueError, RuntimeError)):
            opt.step({"weight": torch.ones(sizes[1]), "bias": torch.ones(sizes[1])})
        np.testing.assert_array_equal(lin.get_parameter("weight").numpy(), before)


def test_fit_after_a_round_trip_through_another_backend_uses_the_optimizers_current_state():
    """(Found on the way, not introduced by the change: the same at 5b926e7.) ``fit`` keeps its train step in
    ``optimizer.step_cache``, and torch's step holds the engine it was made with (``make_step``: ``eng =
    optimizer.engine(...)``). After ``model.to(backend="jax")`` and back, the optimizer has a new torch engine
    (with the state carried through jax), but a later ``fit`` reuses the cached step and its old engine: here the
    state reset on jax is ignored and the moments of the first epoch are used."""
    pytest.importorskip("jax")
    x, y = _data(rows=16)
    net, ref = _twins()
    opt = lm.optim.Adam(net, lr=0.01)

    def fit():
        lm.fit(net, lm.losses.cross_entropy, opt, (x, y), batch_size=8, shuffle=False, progress=False)

    def ref_epoch(ref_opt):
        for i in (0, 8):
            ref_opt.zero_grad()
            F.cross_entropy(ref(torch.from_numpy(x[i:i + 8])), torch.from_numpy(y[i:i + 8])).backward()
            ref_opt.step()

    fit()
    ref_epoch(torch.optim.Adam(ref.parameters(), lr=0.01, foreach=False))
    net.to(backend="jax")
    opt.load_state_dict({})  # a fresh start of the optimizer (on jax's engine)
    net.to(backend="torch")
    fit()
    ref_epoch(torch.optim.Adam(ref.parameters(), lr=0.01, foreach=False))
    _assert_same(net, ref)
