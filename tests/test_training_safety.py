"""What fit and the training rooms must never do to a user, found by attacking the speed work of issue 13:
invalidate or change an array the user holds (snapshots, arrays device_put from a weight, batches kept by a
forward, NumPy arrays assigned to a parameter), lose the model to an interrupt right after a compiled step,
apply another parameter's gradient, refuse a legitimate optimizer, or fail on data of unknown length; and
that the kept host buffers, reused gather buffers and channels-last convolutions give the results of the
plain paths.

"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import lamina as lm

from conftest import BACKENDS, interrupt_at, to_np

jax_only = pytest.mark.skipif("jax" not in BACKENDS, reason="jax not selected")
torch_only = pytest.mark.skipif("torch" not in BACKENDS, reason="torch not selected")


@pytest.fixture(autouse=True)
def _donate_small_models_too(monkeypatch):
    """jax fit donates values only Lamina refers to without a copy from ADOPT_FROM_BYTES on: these models are
    small, so the threshold goes to 0 and the attacks reach that path."""
    if "jax" in BACKENDS:
        import lamina.training.jax as room

        monkeypatch.setattr(room, "ADOPT_FROM_BYTES", 0)


def _xy(n=64, d=4, out=1, seed=0):
    r = np.random.default_rng(seed)
    return r.normal(size=(n, d)).astype(np.float32), r.normal(size=(n, out)).astype(np.float32)


def _mlp():
    return lm.Sequential(lm.Linear(4, 8), lm.ReLU(), lm.Linear(8, 1))


def _fitted_jax_mlp():
    """A small jax MLP after one fit; returns a function that fits it once more (``.net``: the model)."""
    lm.set_backend("jax")
    lm.manual_seed(0)
    net = _mlp()
    opt = lm.optim.Adam(net, lr=0.01)
    x, y = _xy()

    def fit_again():
        lm.fit(net, lm.losses.mse, opt, (x, y), batch_size=16, progress=False)

    fit_again()
    fit_again.net = net
    return fit_again


# ----- found broken, fixed -----------------------------------------------------------------------------------
@jax_only
def test_jax_fit_keeps_a_snapshot_valid_after_the_model_moved_to_its_own_device():
    """README: "a state_dict() snapshot ... stays valid after fit". ``model.to("cpu")`` on jax gives each
    parameter ``jax.device_put(old, cpu)``: a new array object on the SAME buffer as the snapshot's. Only
    Lamina refers to the new object, so donating what only Lamina refers to by reference count (tried in
    ccb00dd, withdrawn) deleted the snapshot's array with it ("Array has been deleted")."""
    fit_again = _fitted_jax_mlp()
    net = fit_again.net
    snapshot = net.state_dict()
    expected = {k: np.array(v) for k, v in snapshot.items()}
    net.to("cpu")
    fit_again()
    for k, v in snapshot.items():
        np.testing.assert_array_equal(np.asarray(v), expected[k])


@jax_only
def test_jax_fit_keeps_an_array_device_put_from_a_weight_valid():
    """Same cause: ``jax.device_put(weight, device)`` makes a second array object on the weight's buffer; the
    reference count of the weight's own object does not see it, fit donates the buffer, the user's array dies."""
    import jax

    fit_again = _fitted_jax_mlp()
    mine = jax.device_put(fit_again.net[0].weight, jax.devices()[0])
    expected = np.array(mine)
    fit_again()
    np.testing.assert_array_equal(np.asarray(mine), expected)


@jax_only
def test_jax_data_parallel_fit_keeps_a_state_dict_snapshot_valid():
    """Same cause through Lamina's own code: ``place_model`` (training/jax_sharding.py) device_puts every value
    onto the mesh, which on the device already holding it shares the buffer with the snapshot's array."""
    lm.set_backend("jax")
    lm.manual_seed(0)
    net = _mlp()
    x, y = _xy()
    net.ensure_built(x[:2])
    opt = lm.optim.Adam(net, lr=0.01)
    snapshot = net.state_dict()
    expected = {k: np.array(v) for k, v in snapshot.items()}
    lm.fit(net, lm.losses.mse, opt, (x, y), batch_size=16, progress=False, parallel=lm.distributed.DataParallel())
    for k, v in snapshot.items():
        np.testing.assert_array_equal(np.asarray(v), expected[k])


@torch_only
def test_fit_trains_an_optimizer_over_a_loss_parameter_only():
    """Temperature scaling: a frozen model, a temperature inside the loss, the optimizer over the temperature
    only. Trained on torch (and tensorflow) before ccef8a2; ``_check_optimizer`` (train.py) now refuses it
    saying "fit would update nothing", which is false: the temperature is updated. A parameter that belongs
    to no module is not "another model's"."""
    lm.set_backend("torch")
    lm.manual_seed(0)
    r = np.random.default_rng(0)
    x, y = r.normal(size=(64, 4)).astype(np.float32), r.integers(0, 3, 64)
    net = lm.Sequential(lm.Linear(4, 3))
    net.ensure_built(x[:2])
    for p in net.parameters():
        p.trainable = False
    temperature = lm.Parameter((), init=lm.init.ones())
    temperature.initialize()
    loss = lambda out, yb: lm.losses.cross_entropy(out / temperature.value, yb)  # noqa: E731
    lm.fit(net, loss, lm.optim.SGD([temperature], lr=0.5), (x, y), batch_size=16, progress=False, epochs=2)
    assert float(to_np(temperature.value)) != 1.0


class _TopAndHead(lm.Module):
    """A model with parameters of its own named like its head's: ``weight``/``bias`` and ``head.weight``/
    ``head.bias``, of the same shapes."""

    def __init__(self):
        super().__init__()
        self.weight = lm.Parameter((3, 3), init=lm.init.normal())
        self.bias = lm.Parameter((3,), init=lm.init.normal())
        self.head = lm.Linear(3, 3)

    def forward(self, x):
        return self.head(x @ self.weight + self.bias)


@pytest.mark.parametrize("backend_name", [b for b in ("torch", "jax") if b in BACKENDS])
def test_opt_step_over_a_part_takes_the_parts_gradients_when_names_collide(backend_name):
    """``opt = SGD(model.head)`` names its parameters ``weight``/``bias``; the whole model's gradients
    (``value_and_grad``) hold ``weight`` (the model's own) and ``head.weight``. ``Optimizer.step`` (optim.py)
    looks the optimizer's names up first and finds the model's own ``weight`` gradient, so the head is updated
    with another parameter's gradient, silently; the path lookup added in ccef8a2 is only tried when a name is
    missing. Prefer the paths in the whole model when the gradients hold every one of them."""
    lm.set_backend(backend_name)
    lm.manual_seed(0)
    m = _TopAndHead()
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    m.ensure_built(x)
    opt = lm.optim.SGD(m.head, lr=0.1)
    _, grads = lm.value_and_grad(lambda mm, xb: lm.ops.sum(mm(xb) ** 2), compile=False)(m, x)
    before = to_np(m.head.weight).copy()
    expected = before - 0.1 * to_np(grads["head.weight"])
    assert not np.allclose(to_np(grads["head.weight"]), to_np(grads["weight"]))  # the two gradients differ
    opt.step(grads)
    np.testing.assert_allclose(to_np(m.head.weight), expected, rtol=1e-5, atol=1e-6)


@jax_only
def test_jax_fit_interrupted_right_after_a_compiled_step_leaves_the_model_usable():
    """A KeyboardInterrupt delivered at the first check for signals after the compiled step returned (entering
    ``fresh_seeds``, in ``_epoch``'s ``call``, training/jax.py) leaves ``held`` with the arrays that call
    donated: the epoch's ``finally`` publishes them, so every parameter of the model is a deleted array and the
    next fit fails (the kept loss vector ``spare`` is deleted too). Pre-existing for the parameters (22a7947
    too), today for the loss vector. Fix: store the call's results in ``held`` before anything else runs
    (before ``fresh_seeds()``), and never publish or keep a deleted array in the ``finally``. (The interrupt is
    injected with ``sys.settrace`` at that function's entry; if ``fresh_seeds`` is renamed, update the name.)"""
    lm.set_backend("jax")
    lm.manual_seed(0)
    net = _mlp()
    opt = lm.optim.Adam(net, lr=0.01)
    x, y = _xy()
    kw = dict(batch_size=8, progress=False, metrics=[lm.losses.mse])
    lm.fit(net, lm.losses.mse, opt, (x, y), **kw)
    entered = interrupt_at("fresh_seeds", 3, "call")
    try:
        with pytest.raises(KeyboardInterrupt):
            lm.fit(net, lm.losses.mse, opt, (x, y), **kw)
    finally:
        sys.settrace(None)
    assert entered[0] == 3
    for v in net.state_dict().values():
        np.asarray(v)  # "Array has been deleted" here
    lm.fit(net, lm.losses.mse, opt, (x, y), **kw)



_RETURN_PATHS = {  # fit's keywords (or "loop": a user's own loop), and whether to pack a small model's values
    "one call per step, a metric (call)": (dict(steps_per_call=1, metrics=[lm.losses.mse]), True),
    "the same, unpacked": (dict(steps_per_call=1, metrics=[lm.losses.mse]), False),
    "back to back": (dict(steps_per_call=1), True),
    "back to back, unpacked": (dict(steps_per_call=1), False),
    "grouped back to back": (dict(steps_per_call=2), False),
    "a list of batches (step)": (dict(steps_per_call=1, batches=True), False),
    "a list of batches, grouped (step_many)": (dict(steps_per_call=2, batches=True), False),
    "a user's own loop (the engine)": ("loop", False),
}


@jax_only
@pytest.mark.parametrize("path", list(_RETURN_PATHS))
def test_jax_ctrl_c_as_a_compiled_step_returns_keeps_its_results(monkeypatch, path):
    """A Ctrl-C during a compiled call is raised as the call returns: the values it was given were donated, and
    its result is their only copy. Every path keeps it (``_kept``): after the interrupt the model and the optimizer
    hold the values of exactly ``opt.steps`` steps (the optimizer's own count agrees), the same as an
    uninterrupted hand loop over the same batches (``lm.value_and_grad`` + ``opt.step``), and the next fit
    trains on. (Before: the model kept deleted arrays, "Array has been deleted", and the next fit failed.)"""
    import lamina.training.jax_packing as packing

    kw, packed = _RETURN_PATHS[path]
    if not packed:
        monkeypatch.setattr(packing, "PACK_BELOW_BYTES", -1)
    lm.set_backend("jax")
    x, y = _xy(48)
    order = np.random.default_rng(0).permutation(48)  # fit's first epoch, seed 0
    lm.manual_seed(0)
    net = _mlp()
    opt = lm.optim.Adam(net, lr=0.01)
    if kw == "loop":
        batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 48, 8)]
        grad = lm.value_and_grad(lambda m, xb, yb: lm.losses.mse(m(xb), yb))
        opt.step(grad(net, *batches[0])[1])
        hits = interrupt_at("_kept", 3, "return")
        try:
            with pytest.raises(KeyboardInterrupt):
                for xb, yb in batches[1:]:
                    opt.step(grad(net, xb, yb)[1])
        finally:
            sys.settrace(None)
        seen = batches
    else:
        kw = dict(kw)
        if kw.pop("batches", False):
            data = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 48, 8)]
            seen = data + data
        else:
            data = (x, y)
            seen = [(x[order[i:i + 8]], y[order[i:i + 8]]) for i in range(0, 48, 8)] * 2
        kw.update(batch_size=8, progress=False)
        lm.fit(net, lm.losses.mse, opt, data, **kw)
        hits = interrupt_at("_kept", 3, "return")
        try:
            with pytest.raises(KeyboardInterrupt):
                lm.fit(net, lm.losses.mse, opt, data, **kw)
        finally:
            sys.settrace(None)
    assert hits[0] == 3
    done = opt.steps
    assert done > (1 if kw == "loop" else 6)  # some steps of the interrupted run are kept
    got = {k: to_np(v) for k, v in net.state_dict().items()}  # none deleted
    assert int(np.asarray(opt.state_dict()["0.weight/step"])) == done
    lm.manual_seed(0)
    ref = _mlp()
    ref_opt = lm.optim.Adam(ref, lr=0.01)
    ref_grad = lm.value_and_grad(lambda m, xb, yb: lm.losses.mse(m(xb), yb))
    for xb, yb in seen[:done]:
        ref_opt.step(ref_grad(ref, xb, yb)[1])
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(got[k], to_np(v), rtol=1e-5, atol=1e-6, err_msg=k)
    lm.fit(net, lm.losses.mse, opt, (x, y), batch_size=8, progress=False)
    assert opt.steps == done + 6

@jax_only
def test_jax_parameter_assigned_from_an_aligned_numpy_array_does_not_share_its_memory():
    """``Parameter._assign``: "The parameter never shares memory with the caller's array". The jax adapter's
    ``from_numpy`` ignores ``copy=True`` and ``jax.device_put`` aliases 64-byte-aligned host memory on CPU
    (every array torch allocates is so aligned, ``t.numpy()``): writing into the array afterwards changes the
    parameter. Pre-existing (22a7947 too). Fix in backends/jax.py ``from_numpy``: honour ``copy`` (copy on the
    host first, e.g. ``np.array(a, copy=True)``), and pass ``copy=False`` where aliasing is wanted (training/
    jax.py ``on_device``'s kept buffer)."""
    lm.set_backend("jax")
    net = lm.Linear(16, 16)
    net.ensure_built(np.zeros((1, 16), np.float32))
    raw = np.empty(16 * 16 * 4 + 64, np.uint8)
    start = -raw.ctypes.data % 64
    mine = raw[start:start + 16 * 16 * 4].view(np.float32).reshape(16, 16)
    mine[:] = 1.0
    net.get_parameter("weight").value = mine
    mine[:] = 5.0
    np.testing.assert_array_equal(to_np(net.weight), np.ones((16, 16), np.float32))


def test_fit_over_batches_whose_length_is_unknown():
    """A ``tf.data.Dataset`` whose cardinality is unknown (after ``filter``) raises TypeError from ``len``.
    ``_known_empty`` (ccef8a2) allows for it, but ``_n_batches`` (train.py, the bar's total) calls ``len``
    unguarded, so fit crashes. Pre-existing. Fix: catch TypeError there and return None."""
    backend = next(b for b in ("torch", "jax", "tensorflow") if b in BACKENDS)
    lm.set_backend(backend)
    x, y = _xy(32, out=2)

    class UnknownLength:
        def __iter__(self):
            return ((x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8))

        def __len__(self):
            raise TypeError("The dataset length is unknown.")

    net = lm.Sequential(lm.Linear(4, 2))
    h = lm.fit(net, lm.losses.mse, lm.optim.SGD(net, lr=0.1), UnknownLength(), progress=False)
    assert np.isfinite(h["loss"][0])


# ----- attacks that held ---------------------------------------------------------------------------------------
class _Seen(lm.Module):
    """Keeps the batch its forward saw (``self.seen = x``)."""

    def __init__(self):
        super().__init__()
        self.lin = lm.Linear(4, 1)
        self.seen = None

    def forward(self, x):
        self.seen = x
        return self.lin(x)


@jax_only
@pytest.mark.parametrize("batch_size", [32, 12])
def test_jax_kept_host_buffer_never_changes_a_batch_or_target_the_user_kept(batch_size):
    """The shuffled rows live in a host buffer that device_put aliases and the next fit overwrites: a batch a
    forward stored and targets a metric kept must not change when a later fit trains on other rows."""
    lm.set_backend("jax")
    lm.manual_seed(0)
    (x1, y1), (x2, y2) = _xy(32, seed=1), _xy(32, seed=2)
    kept = []

    def keep(out, yb):
        kept.append(yb)
        return 0.0

    net = _Seen()
    opt = lm.optim.SGD(net, lr=0.01)
    lm.fit(net, lm.losses.mse, opt, (x1, y1), batch_size=batch_size, progress=False, seed=1, metrics=[keep])
    seen, seen_values = net.seen, np.array(net.seen)
    kept_values = [np.array(k) for k in kept]
    assert all(any(np.array_equal(row, r) for r in x1) for row in seen_values)
    lm.fit(net, lm.losses.mse, opt, (x2, y2), batch_size=batch_size, progress=False, seed=2, metrics=[keep])
    lm.fit(net, lm.losses.mse, opt, (x2, y2), batch_size=batch_size, progress=False, seed=3)
    np.testing.assert_array_equal(np.asarray(seen), seen_values)
    for k, v in zip(kept, kept_values):
        np.testing.assert_array_equal(np.asarray(k), v)


class _TwoInputs(lm.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = lm.Linear(4, 8), lm.Linear(3, 8), lm.Linear(8, 3)

    def forward(self, u, v):
        return self.head(lm.ops.relu(self.a(u) + self.b(v)))


def _two_input_data(n, seed, as_dict):
    r = np.random.default_rng(seed)
    u, v, labels = r.normal(size=(n, 4)), r.normal(size=(n, 3)), r.integers(0, 3, n)  # float64, int64
    return ({"u": u, "v": v} if as_dict else (u.astype(np.float32), v)), labels


@jax_only
def test_jax_fits_over_changing_shapes_and_several_inputs_match_the_batch_loop():
    """The kept host buffers and loss vector across fits whose row counts, batch sizes and partial last batches
    change (a dict of two inputs, float64 and int64 arrays, grouped steps): the losses and weights of fit's
    epoch-on-the-device equal those of fit over the same shuffled batches given as a list (one compiled step
    per batch, no kept buffer)."""
    lm.set_backend("jax")
    plan = [(40, 8), (40, 8), (36, 8), (13, 16)]

    def run(as_list):
        lm.manual_seed(0)
        net = _TwoInputs()
        opt = lm.optim.Adam(net, lr=0.01)
        losses = []
        for i, (n, bs) in enumerate(plan):
            x, y = _two_input_data(n, i % 2, as_dict=True)
            if as_list:
                o = np.random.default_rng(i).permutation(n)
                data = [({k: v[o][j:j + bs] for k, v in x.items()}, y[o][j:j + bs]) for j in range(0, n, bs)]
                losses += lm.fit(net, lm.losses.cross_entropy, opt, data, progress=False, steps_per_call=1)["loss"]
            else:
                losses += lm.fit(net, lm.losses.cross_entropy, opt, (x, y), batch_size=bs, progress=False, seed=i,
                                 steps_per_call=4)["loss"]
        return np.array(losses), {k: to_np(v) for k, v in net.state_dict().items()}

    ref_losses, ref_weights = run(as_list=True)
    losses, weights = run(as_list=False)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for k, v in weights.items():
        np.testing.assert_allclose(v, ref_weights[k], rtol=1e-5, atol=1e-6)


class _Boom(Exception):
    pass


@jax_only
@pytest.mark.parametrize("where", ["batch callback", "metric"])
def test_jax_fit_after_an_epoch_a_callback_or_metric_broke_matches_the_eager_loop(where):
    """An exception from a batch callback (sync path) or a metric (each-step path) abandons the epoch midway;
    the steps done are published, counted, and a later fit resumes from them as the eager loop does."""
    lm.set_backend("jax")
    x, y = _xy(100)

    class Raise(lm.Callback):
        def __init__(self):
            self.n = 0

        def on_batch_end(self, batch, logs):
            self.n += 1
            if self.n == 5:
                raise _Boom

    def metric():
        n = [0]

        def m(out, yb):
            n[0] += 1
            if n[0] == 5:
                raise _Boom
            return 0.0
        return m

    def run(compile):
        lm.manual_seed(0)
        net = _mlp()
        opt = lm.optim.Adam(net, lr=0.01)
        kw = dict(batch_size=8, progress=False, compile=compile)
        lm.fit(net, lm.losses.mse, opt, (x, y), seed=1, **kw)
        extra = {"callbacks": [Raise()]} if where == "batch callback" else {"metrics": [metric()]}
        with pytest.raises(_Boom):
            lm.fit(net, lm.losses.mse, opt, (x, y), seed=2, epochs=2, **extra, **kw)
        steps = opt.steps
        losses = lm.fit(net, lm.losses.mse, opt, (x, y), seed=3, epochs=2, **kw)["loss"]
        return steps, losses, {k: to_np(v) for k, v in net.state_dict().items()}

    ref_steps, ref_losses, ref_weights = run(False)
    steps, losses, weights = run(None)
    assert steps == ref_steps
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-7)
    for k, v in weights.items():
        np.testing.assert_allclose(v, ref_weights[k], rtol=1e-5, atol=1e-6)


class _Tied(lm.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = lm.Linear(4, 4), lm.Linear(4, 4), lm.Linear(4, 1)
        self.c.weight = self.a.get_parameter("weight")

    def forward(self, x):
        return self.b(lm.ops.relu(self.c(self.a(x))))


class _KeepEach(lm.Callback):
    def __init__(self, hook):
        self.hook, self.kept = hook, []

    def on_batch_end(self, batch, logs):
        if self.hook == "batch":
            self.kept.append(self.trainer.model.state_dict())

    def on_epoch_end(self, epoch, logs):
        if self.hook == "epoch":
            self.kept.append(self.trainer.model.state_dict())


@jax_only
@pytest.mark.parametrize("case", ["numpy view", "tied", "batchnorm buffers", "frozen", "batch callback",
                                  "epoch callback", "early stopping"])
def test_jax_donation_by_reference_count_keeps_what_the_user_holds(case):
    """Values a user holds in the ways the reference count does see (a NumPy view, the values of tied or
    frozen parameters and of buffers, state_dict()s kept by callbacks) stay intact over later fits."""
    lm.set_backend("jax")
    lm.manual_seed(0)
    x, y = _xy()
    callbacks = []
    if case == "tied":
        net = _Tied()
    elif case == "batchnorm buffers":
        net = lm.Sequential(lm.Linear(4, 8), lm.BatchNorm1d(8), lm.ReLU(), lm.Linear(8, 1))
    else:
        net = _mlp()
    if case == "frozen":
        net.ensure_built(x[:2])
        net[0].get_parameter("weight").trainable = False
    if case in ("batch callback", "epoch callback"):
        callbacks = [_KeepEach(case.split()[0])]
    if case == "early stopping":
        callbacks = [lm.EarlyStopping(monitor="loss", patience=1, restore_best=True)]
    opt = lm.optim.Adam(net, lr=0.01)
    kw = dict(batch_size=16, progress=False, callbacks=callbacks, epochs=2)
    lm.fit(net, lm.losses.mse, opt, (x, y), **kw)
    if case == "numpy view":
        held = [np.asarray(net[0].weight)]
    elif case == "tied":
        held = [net.c.weight]
    elif case == "batchnorm buffers":
        held = [v for k, v in net.state_dict().items() if "running" in k]
    elif case == "frozen":
        held = [net[0].weight]
    elif case in ("batch callback", "epoch callback"):
        held = [v for d in callbacks[0].kept for v in d.values()]
    else:
        held = [net[0].weight, net[2].bias]
    expected = [np.array(h) for h in held]
    lm.fit(net, lm.losses.mse, opt, (x, y), **kw)
    lm.fit(net, lm.losses.mse, opt, (x, y), **kw)
    for h, e in zip(held, expected):
        np.testing.assert_array_equal(np.asarray(h), e)
    for v in net.state_dict().values():
        np.asarray(v)


class _KeepBatch(lm.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = lm.Linear(4, 3), lm.Linear(2, 3)
        self.kept = []

    def forward(self, u, v):
        self.kept.append((u, u.clone()))
        self.kept.append((v, v.clone()))
        return self.a(u) + self.b(v)


@torch_only
@pytest.mark.parametrize("as_dict", [False, True])
def test_torch_reused_gather_buffers_keep_held_batches_and_train_on_the_right_rows(monkeypatch, as_dict):
    """Several chunks per epoch (GATHER_BYTES small), two inputs, float64 and int64 arrays: batches a forward
    kept and targets a metric kept never change, and the weights equal those of training on the same shuffled
    batches given as a list."""
    import torch

    import lamina.training.torch as room

    monkeypatch.setattr(room, "GATHER_BYTES", 1000)
    lm.set_backend("torch")
    r = np.random.default_rng(0)
    n = 100
    u, v, y = r.normal(size=(n, 4)), r.normal(size=(n, 2)).astype(np.float32), r.integers(0, 3, n)
    x = {"u": u, "v": v} if as_dict else (u, v)
    kept_targets = []

    def keep(out, yb):
        kept_targets.append((yb, yb.clone()))
        return 0.0

    lm.manual_seed(0)
    net = _KeepBatch()
    opt = lm.optim.SGD(net, lr=0.1)
    for seed in range(3):
        lm.fit(net, lm.losses.cross_entropy, opt, (x, y), batch_size=8, progress=False, seed=seed, epochs=2,
               metrics=[keep])
    assert all(torch.equal(a, b) for a, b in net.kept + kept_targets)

    lm.manual_seed(0)
    ref = _KeepBatch()
    ref_opt = lm.optim.SGD(ref, lr=0.1)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        for _ in range(2):
            o = rng.permutation(n)
            batches = [(((u[o][i:i + 8].astype(np.float32), v[o][i:i + 8]) if not as_dict else
                         {"u": u[o][i:i + 8].astype(np.float32), "v": v[o][i:i + 8]}), y[o][i:i + 8])
                       for i in range(0, n, 8)]
            lm.fit(ref, lm.losses.cross_entropy, ref_opt, batches, progress=False)
    for (k, a), (_, b) in zip(net.state_dict().items(), ref.state_dict().items()):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-6, atol=1e-7, err_msg=k)


class _ConvOps(lm.Module):
    """Conv outputs through concatenation, a channel flip and slice, a transpose, reshapes and a swap."""

    def __init__(self, **kw):
        super().__init__()
        self.c1 = lm.Conv2d(4, 6, 3, **kw)
        self.bn = lm.BatchNorm2d(6)
        self.c2 = lm.Conv2d(6, 6, 3, padding="same", groups=3)
        self.c3 = lm.Conv2d(11, 4, 1)
        self.fc = lm.Linear(3)

    def forward(self, x):
        o = lm.ops
        a = o.relu(self.bn(self.c1(x)))
        h = self.c3(o.concat([a, o.flip(self.c2(a), axis=1)[:, 1:]], axis=1))
        h = o.transpose(h, (0, 2, 3, 1))
        h = o.swapaxes(o.reshape(h, (h.shape[0], -1, h.shape[-1])), 1, 2)[:, 1:3]
        return self.fc(o.reshape(h, (h.shape[0], -1)))


@torch_only
@pytest.mark.parametrize("kw", [{}, {"stride": 2}, {"dilation": 2}, {"padding": ((0, 1), (2, 0))}])
def test_torch_channels_last_conv_outputs_through_layout_sensitive_ops_match_the_default_layout(monkeypatch, kw):
    """Outputs, input gradients, parameter gradients and an SGD fit with 2-D convolutions on channels-last
    memory equal the same computed in torch's default layout (SGD: Adam's sign-like first steps amplify
    float32 noise in gradients that are zero in exact arithmetic, such as a conv bias before BatchNorm)."""
    import torch

    import lamina.backends.torch as tb

    lm.set_backend("torch")
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 4, 9, 9)).astype(np.float32))
    results = []
    for channels_last in (True, False):
        monkeypatch.setattr(tb, "CONV2D_CHANNELS_LAST_ON_CPU", channels_last)
        lm.manual_seed(0)
        net = _ConvOps(**kw)
        xx = x.clone().requires_grad_(True)
        out = net(xx)
        (out ** 2).sum().backward()
        grads = [p.grad.clone() for _, p in net.named_parameters()]
        lm.fit(net, lm.losses.mse, lm.optim.SGD(net, lr=0.01), (x.numpy(), np.zeros((3, 3), np.float32)),
               batch_size=2, progress=False, epochs=2)
        results.append((out.detach(), xx.grad.clone(), grads, [to_np(v) for v in net.state_dict().values()]))
    (o1, gx1, g1, w1), (o2, gx2, g2, w2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@torch_only
def test_a_channels_last_conv_output_converts_to_the_other_backends_and_files_with_its_values(tmp_path):
    """DLPack and NumPy conversions and a safetensors round trip of a channels-last output keep the logical
    (N, C, H, W) values."""
    import torch

    lm.set_backend("torch")
    lm.manual_seed(0)
    out = lm.Conv2d(3, 5, 3)(torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 6, 6))
                                              .astype(np.float32))).detach()
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    expected = out.contiguous().numpy()
    for name in [b for b in ("jax", "numpy", "tensorflow") if b in BACKENDS]:
        np.testing.assert_array_equal(to_np(lm.get_backend(name).from_other(out)), expected)
    lm.save({"o": out}, tmp_path / "o.safetensors")
    np.testing.assert_array_equal(to_np(lm.load(tmp_path / "o.safetensors")["o"]), expected)


@pytest.mark.parametrize("backend_name", [b for b in ("torch", "jax") if b in BACKENDS])
def test_fit_accepts_the_legitimate_optimizers_the_new_check_might_refuse(backend_name):
    """An optimizer made before a lazy model is built, over the lazy head only, over a parameter list, over the
    inner model of a wrapper: fit trains; one made for a copy of the model is refused."""
    import copy

    lm.set_backend(backend_name)
    x, y = _xy(out=2)

    def lazy():
        lm.manual_seed(0)
        return lm.Sequential(lm.Linear(8), lm.ReLU(), lm.Linear(2))

    net = lazy()
    for opt in (lm.optim.Adam(net, lr=0.01), lm.optim.Adam(list(net.parameters()), lr=0.01)):
        lm.fit(net, lm.losses.mse, opt, (x, y), batch_size=16, progress=False)
        before = to_np(net[2].bias).copy()
        lm.fit(net, lm.losses.mse, opt, (x, y), batch_size=16, progress=False)
        assert not np.array_equal(to_np(net[2].bias), before)
    net = lazy()
    lm.fit(net, lm.losses.mse, lm.optim.Adam(net[2], lr=0.01), (x, y), batch_size=16, progress=False)
    inner = lazy()
    lm.fit(lm.Sequential(inner), lm.losses.mse, lm.optim.Adam(inner, lr=0.01), (x, y), batch_size=16,
           progress=False)
    with pytest.raises(ValueError, match="made for other parameters"):
        lm.fit(copy.deepcopy(inner), lm.losses.mse, lm.optim.Adam(inner, lr=0.01), (x, y), progress=False)
