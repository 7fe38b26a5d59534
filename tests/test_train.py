"""The training loop: fit, evaluate, predict, callbacks, compiled steps, reproducibility and resuming."""

import os

import numpy as np
import pytest

import lamina as lm

from conftest import GRAD_BACKENDS, MyLinear, to_np


def blobs(n=256, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centers = np.array([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.5]])
    x = (centers[y] + rng.standard_normal((n, 2)) * 0.7).astype(np.float32)
    return x, y


def small_net():
    return lm.Sequential(lm.Linear(16), lm.ReLU(), MyLinear(16, 8), lm.Linear(3))


def test_fit_learns_and_reports_history(grad_backend):
    x, y = blobs()
    net = small_net()
    history = lm.fit(net, lm.losses.cross_entropy, lm.optim.Adam(net, lr=0.02), (x[:200], y[:200]), epochs=8,
                     batch_size=32, validation_data=(x[200:], y[200:]), metrics=[lm.losses.accuracy], progress=False)
    assert list(history.history) == ["loss", "accuracy", "val_loss", "val_accuracy"]
    assert all(m.training for m in net.modules())  # back in the mode it had before fit
    assert len(history["loss"]) == 8 and history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["val_accuracy"][-1] > 0.9
    # evaluate and predict agree with an independent computation of the same figures
    logits = to_np(lm.predict(net, x[200:], batch_size=10))
    assert logits.shape == (56, 3)
    res = lm.evaluate(net, lm.losses.cross_entropy, (x[200:], y[200:]), metrics=[lm.losses.accuracy])
    z = logits - logits.max(1, keepdims=True)
    ce = -(z[np.arange(56), y[200:]] - np.log(np.exp(z).sum(1))).mean()
    np.testing.assert_allclose(res["loss"], ce, rtol=1e-4)
    np.testing.assert_allclose(res["accuracy"], (logits.argmax(1) == y[200:]).mean())
    np.testing.assert_allclose(res["loss"], history["val_loss"][-1], rtol=1e-4)


def test_fit_accepts_any_iterable_of_batches(grad_backend):
    x, y = blobs(64)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    net = small_net()
    history = lm.fit(net, lm.losses.cross_entropy, lm.optim.SGD(net, lr=0.1), batches, epochs=2, progress=False)
    assert len(history["loss"]) == 2


def run_losses(backend, steps=20, seed=0):
    lm.set_backend(backend)
    lm.manual_seed(seed)
    x, y = blobs(steps * 8)
    net = small_net()
    seen = []

    class Record(lm.Callback):
        def on_batch_end(self, batch, logs):
            seen.append(logs["loss"])

    lm.fit(net, lm.losses.cross_entropy, lm.optim.Adam(net, lr=0.01), (x, y), epochs=1, batch_size=8, seed=3,
           callbacks=[Record()], progress=False)
    return np.array(seen), {k: to_np(v) for k, v in net.state_dict().items()}


def test_same_seed_same_losses_on_each_backend(grad_backend):
    a, wa = run_losses(grad_backend)
    b, wb = run_losses(grad_backend)
    np.testing.assert_array_equal(a, b)
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])


@pytest.mark.skipif(not {"torch", "jax"} <= set(GRAD_BACKENDS), reason="needs both torch and jax")
def test_first_20_steps_agree_between_torch_and_jax():
    lt, wt = run_losses("torch")
    lj, wj = run_losses("jax")
    assert len(lt) == 20
    np.testing.assert_allclose(lt, lj, rtol=1e-5, atol=1e-6)
    for k in wt:
        np.testing.assert_allclose(wt[k], wj[k], rtol=1e-4, atol=1e-5)


def test_jax_train_step_is_one_program_compiled_once():
    if "jax" not in GRAD_BACKENDS:
        pytest.skip("jax not installed")
    lm.set_backend("jax")
    traces = []

    def loss(out, y):
        traces.append(1)  # runs only while jax traces a program
        return lm.losses.cross_entropy(out, y)

    x, y = blobs(128)
    net = small_net()
    lm.fit(net, loss, lm.optim.Adam(net), (x, y), epochs=3, batch_size=32, steps_per_call=1, progress=False)
    assert len(traces) == 1  # 12 steps, one program
    traces.clear()
    net = small_net()
    # 40 batches an epoch: two calls of 16 steps, then 8 single steps; each program is compiled once
    # (the default groups only where a measured step is fast: tests/test_training_room.py)
    lm.fit(net, loss, lm.optim.Adam(net), blobs(320), epochs=3, batch_size=8, steps_per_call=16, progress=False)
    assert len(traces) == 2


class Record(lm.Callback):
    def __init__(self):
        self.seen = []

    def on_batch_end(self, batch, logs):
        self.seen.append((batch, logs["loss"]))


def test_steps_run_as_one_call_match_steps_run_one_by_one():
    if "jax" not in GRAD_BACKENDS:
        pytest.skip("jax not installed")
    x, y = blobs(200)
    results = []
    for k in (1, 16):
        lm.set_backend("jax")
        lm.manual_seed(0)
        net = small_net()
        opt = lm.optim.Adam(net, lr=0.01, schedule=lambda s: 0.01 / (1 + 0.1 * s))
        record = Record()
        history = lm.fit(net, lm.losses.cross_entropy, opt, (x, y), epochs=2, batch_size=8, steps_per_call=k,
                         callbacks=[record], progress=False)
        results.append((record.seen, history["loss"], {k2: to_np(v) for k2, v in net.state_dict().items()}, opt.steps))
    (seen1, h1, w1, s1), (seen16, h16, w16, s16) = results
    assert s1 == s16 == 50 and [b for b, _ in seen1] == [b for b, _ in seen16]
    np.testing.assert_allclose([v for _, v in seen16], [v for _, v in seen1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h16, h1, rtol=1e-5)
    for key in w1:
        np.testing.assert_allclose(w16[key], w1[key], rtol=1e-5, atol=1e-6)


def test_torch_compile_step_matches_eager():
    if "torch" not in GRAD_BACKENDS:
        pytest.skip("torch not installed")
    x, y = blobs(64)
    out = {}
    for compile in (False, True):
        lm.set_backend("torch")
        lm.manual_seed(0)
        net = small_net()
        out[compile] = lm.fit(net, lm.losses.cross_entropy, lm.optim.Adam(net, lr=0.01), (x, y), epochs=2,
                              batch_size=16, compile=compile, progress=False)["loss"]
    np.testing.assert_allclose(out[True], out[False], rtol=1e-5)


def test_numpy_backend_refuses_to_train():
    lm.set_backend("numpy")
    net = small_net()
    with pytest.raises(lm.BackendError, match="numpy backend cannot train"):
        lm.fit(net, lm.losses.cross_entropy, lm.optim.SGD(net), blobs(16), progress=False)
    with pytest.raises(TypeError, match="fit needs an lm.optim optimizer"):
        lm.fit(net, lm.losses.cross_entropy, None, blobs(16))


def test_callback_events_in_order(grad_backend):
    events = []

    class Spy(lm.Callback):
        def on_train_begin(self, logs):
            events.append("train_begin")

        def on_epoch_begin(self, epoch, logs):
            events.append(f"epoch_begin {epoch}")

        def on_batch_end(self, batch, logs):
            events.append(f"batch {batch}")

        def on_epoch_end(self, epoch, logs):
            events.append(f"epoch_end {epoch} {sorted(logs)}")

        def on_train_end(self, logs):
            events.append("train_end")

    net = small_net()
    lm.fit(net, lm.losses.cross_entropy, lm.optim.SGD(net, lr=0.1), blobs(32), epochs=2, batch_size=16,
           callbacks=[Spy()], progress=False)
    assert events == ["train_begin", "epoch_begin 0", "batch 0", "batch 1", "epoch_end 0 ['loss']",
                      "epoch_begin 1", "batch 0", "batch 1", "epoch_end 1 ['loss']", "train_end"]


def test_early_stopping_stops_and_restores_the_best(grad_backend):
    x, y = blobs()
    net = small_net()

    class Snapshot(lm.Callback):
        values = {}

        def on_epoch_end(self, epoch, logs):
            self.values[epoch] = ({k: to_np(v).copy() for k, v in self.trainer.model.state_dict().items()},
                                  logs["val_loss"])

    snap = Snapshot()
    # a learning rate far too large: validation loss gets worse after the first epochs
    stop = lm.EarlyStopping(monitor="val_loss", patience=2)
    history = lm.fit(net, lm.losses.cross_entropy, lm.optim.SGD(net, lr=3.0), (x[:200], y[:200]), epochs=30,
                     batch_size=200, validation_data=(x[200:], y[200:]), callbacks=[snap, stop], progress=False)
    epochs = len(history["loss"])
    assert epochs < 30
    best = min(snap.values, key=lambda e: snap.values[e][1])
    assert stop.best_epoch == best and epochs == best + 3
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(to_np(v), snap.values[best][0][k])


def test_checkpoint_each_epoch_and_plot(grad_backend, tmp_path):
    net = small_net()
    ckpt = lm.Checkpoint(str(tmp_path / "ep{epoch:02d}.safetensors"))
    history = lm.fit(net, lm.losses.cross_entropy, lm.optim.Adam(net), blobs(64), epochs=3, batch_size=32,
                     metrics=[lm.losses.accuracy], callbacks=[ckpt], progress=False)
    assert [os.path.basename(p) for p in ckpt.saved] == ["ep01.safetensors", "ep02.safetensors", "ep03.safetensors"]
    clone = small_net()
    lm.load_into(clone, ckpt.saved[-1])
    x = blobs(8, seed=5)[0]
    np.testing.assert_array_equal(to_np(clone(x)), to_np(net(x)))
    history.plot(tmp_path / "loss.png")
    data = (tmp_path / "loss.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_progress_bar_only_when_asked_or_on_a_terminal(grad_backend, capsys):
    net = small_net()
    lm.fit(net, lm.losses.cross_entropy, lm.optim.SGD(net), blobs(32), epochs=1, batch_size=16)
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal: quiet
    lm.fit(net, lm.losses.cross_entropy, lm.optim.SGD(net), blobs(32), epochs=1, batch_size=16,
           metrics=[lm.losses.accuracy], progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss=" in err and "accuracy=" in err and "2/2" in err


def test_training_resumes_bit_for_bit_from_a_checkpoint(grad_backend, tmp_path):
    x, y = blobs(96)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 96, 16)]

    def fresh():
        lm.manual_seed(0)
        net = small_net()
        return net, lm.optim.Adam(net, lr=0.01, schedule=lambda s: 0.01 / (1 + s))

    net, opt = fresh()
    lm.fit(net, lm.losses.cross_entropy, opt, batches[:3], epochs=1, progress=False)
    lm.save(net, tmp_path / "mid.safetensors", optimizer=opt)
    straight = lm.fit(net, lm.losses.cross_entropy, opt, batches[3:], epochs=1, progress=False)

    net2, opt2 = fresh()
    net2.build((None, 2))
    lm.load_into(net2, tmp_path / "mid.safetensors", optimizer=opt2)
    assert opt2.steps == 3
    resumed = lm.fit(net2, lm.losses.cross_entropy, opt2, batches[3:], epochs=1, progress=False)
    assert resumed["loss"] == straight["loss"]
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(to_np(net2.state_dict()[k]), to_np(v))


def test_loading_optimizer_state_from_a_file_without_it(grad_backend, tmp_path):
    net = small_net().build((None, 2))
    lm.save(net, tmp_path / "plain.safetensors")
    with pytest.raises(lm.CheckpointError, match="holds no optimizer state"):
        lm.load_into(net, tmp_path / "plain.safetensors", optimizer=lm.optim.Adam(net))


def test_fit_on_backend_arrays_matches_fit_on_numpy_arrays(grad_backend):
    x, y = blobs(64)
    b = lm.get_backend()
    losses = []
    for data in ((x, y), (b.from_numpy(x), b.from_numpy(y))):
        lm.manual_seed(0)
        net = small_net()
        losses.append(lm.fit(net, lm.losses.cross_entropy, lm.optim.Adam(net), data, epochs=2, batch_size=16,
                             seed=4, progress=False)["loss"])
    np.testing.assert_array_equal(losses[0], losses[1])


class _Seen(lm.Module):
    def __init__(self):
        super().__init__()
        self.a = lm.Linear(3, 1)

    def forward(self, x):
        self.seen = x
        return self.a(x)


@pytest.mark.parametrize("steps_per_call", [None, 1, 2])
def test_after_fit_an_attribute_forward_sets_holds_the_last_batch(grad_backend, steps_per_call):
    m = _Seen()
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    y = np.zeros((8, 1), np.float32)
    lm.fit(m, lm.losses.mse, lm.optim.SGD(m, lr=1e-4), (x, y), batch_size=2, shuffle=False,
           steps_per_call=steps_per_call)
    np.testing.assert_array_equal(to_np(m.seen), x[6:])  # as an eager loop leaves it: the last batch
    lm.fit(m, lm.losses.mse, lm.optim.SGD(m, lr=1e-4), [(x[:2], y[:2]), (x[2:4], y[2:4])])
    np.testing.assert_array_equal(to_np(m.seen), x[2:4])


def test_a_batch_forward_kept_is_not_overwritten_by_later_epochs(grad_backend):
    """fit reuses its host buffers of shuffled rows between epochs (torch: the batches are views of them) only
    when nothing holds them: a batch that forward kept keeps its values through more epochs and fits."""
    m = _Seen()
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    y = np.zeros((20, 1), np.float32)
    opt = lm.optim.SGD(m, lr=1e-4)
    lm.fit(m, lm.losses.mse, opt, (x, y), batch_size=4, seed=1)
    kept, values = m.seen, to_np(m.seen).copy()
    assert any((values == row).all(axis=1).any() for row in x)  # rows of x, as forward saw them
    lm.fit(m, lm.losses.mse, opt, (x + 100, y), epochs=3, batch_size=4, seed=2)
    np.testing.assert_array_equal(to_np(kept), values)
    assert to_np(m.seen).min() >= 100  # the new fit's rows


@pytest.mark.parametrize("steps_per_call", [None, 1, 4])
def test_epoch_loss_is_the_same_whether_or_not_something_reads_each_step(grad_backend, steps_per_call, capsys):
    """Without metrics or batch callbacks nothing reads a step's loss, so fit runs the steps back to back and
    reads the losses later: the epoch's loss, the weights and the bar's figure are those of a run that reads
    every step (a batch callback), which are checked against the per-step losses by hand."""
    x, y = blobs(200)  # 200 rows, batch 24: 8 full batches and one of 8
    runs = []
    for record, progress in ((Record(), False), (None, True)):
        lm.manual_seed(0)
        net = small_net()
        opt = lm.optim.Adam(net, lr=0.01)
        kw = {} if steps_per_call is None or grad_backend != "jax" else {"steps_per_call": steps_per_call}
        h = lm.fit(net, lm.losses.cross_entropy, opt, (x, y), epochs=2, batch_size=24, progress=progress,
                   callbacks=[record] if record else [], **kw)
        runs.append((record, h["loss"], {k: to_np(v) for k, v in net.state_dict().items()}, opt.steps))
    (rec, h_each, w_each, s_each), (_, h_back, w_back, s_back) = runs
    assert s_each == s_back == 18
    per_step = np.array([v for _, v in rec.seen])
    rows = np.array(([24] * 8 + [8]) * 2)
    by_hand = [(per_step[:9] * rows[:9]).sum() / 200, (per_step[9:] * rows[9:]).sum() / 200]
    np.testing.assert_allclose(h_each, by_hand, rtol=1e-6)
    np.testing.assert_allclose(h_back, h_each, rtol=1e-6)
    for key in w_each:
        np.testing.assert_allclose(w_back[key], w_each[key], rtol=1e-6, atol=1e-7)
    err = capsys.readouterr().err
    assert "9/9" in err and f"loss={h_back[-1]:.4f}" in err, err[-300:]


def test_torch_epoch_gathered_in_chunks_trains_on_the_same_batches(monkeypatch):
    """fit on torch gathers shuffled rows one chunk at a time: chunks of one batch, of three batches and the
    whole epoch give the same batches, so bit-for-bit the same weights (a dict of two inputs included)."""
    if "torch" not in GRAD_BACKENDS:
        pytest.skip("torch not selected")
    import lamina.training.torch as room

    class Two(lm.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = lm.Linear(2, 3), lm.Linear(2, 3)

        def forward(self, u, v):
            return self.a(u) + self.b(v)

    x, y = blobs(200)
    row_bytes = 2 * x[:1].nbytes + y[:1].nbytes  # u, v and the label
    results = []
    for gather_bytes in (1, 3 * 24 * row_bytes, 1 << 30):
        monkeypatch.setattr(room, "GATHER_BYTES", gather_bytes)
        lm.set_backend("torch")
        lm.manual_seed(0)
        net = Two()
        lm.fit(net, lm.losses.cross_entropy, lm.optim.Adam(net, lr=0.01), ({"u": x, "v": x[::-1].copy()}, y),
               epochs=2, batch_size=24, progress=False)
        results.append({k: to_np(v) for k, v in net.state_dict().items()})
    for other in results[1:]:
        for k in results[0]:
            np.testing.assert_array_equal(other[k], results[0][k], err_msg=k)


class _Holder(lm.Callback):
    """Keeps every parameter value a batch callback can see, and at batch 2 loads zeros into the model."""

    def __init__(self, model, zero_at=None):
        self.model, self.zero_at, self.held, self.seen = model, zero_at, [], []

    def on_batch_end(self, batch, logs):
        values = {k: p.value for k, p in self.model.named_parameters()}
        self.held.append(values)
        self.seen.append(float(to_np(values["0.weight"]).sum()))
        if batch == self.zero_at:
            self.model.load_state_dict({k: np.zeros(to_np(v).shape, np.float32) for k, v in values.items()})


@pytest.mark.parametrize("steps_per_call", [None, 16])
def test_batch_callbacks_see_each_step_hold_its_values_and_their_changes_stick(grad_backend, steps_per_call):
    """A batch callback sees the model after its own step (not after a group of steps), may keep the values it
    sees (a compiled step must not donate them), and a change it makes to the model is what training goes on
    from (on jax the epoch used to step on from its own copy and publish it over the change)."""
    x, y = blobs(400)
    kw = {"steps_per_call": steps_per_call} if grad_backend == "jax" else {}
    net = small_net()
    cb = _Holder(net)
    lm.fit(net, lm.losses.cross_entropy, lm.optim.Adam(net, lr=0.01), (x, y), epochs=1, batch_size=8,
           callbacks=[cb], progress=False, **kw)
    assert len(set(cb.seen)) == 50  # 50 steps, 50 different models seen
    for values in cb.held:  # every value a callback kept is still readable
        for v in values.values():
            to_np(v)
    net = small_net()
    cb = _Holder(net, zero_at=2)
    lm.fit(net, lm.losses.cross_entropy, lm.optim.SGD(net, lr=0.0), (x, y), epochs=1, batch_size=8,
           callbacks=[cb], progress=False, **kw)
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(to_np(v), 0.0, err_msg=k)


def test_an_interrupted_jax_epoch_counts_every_step_it_applied(monkeypatch):
    """Ctrl-C during the steps that run back to back: the steps already applied are counted (the schedule and
    a checkpoint use the count), as the optimizer state's own step count has them."""
    if "jax" not in GRAD_BACKENDS:
        pytest.skip("jax not selected")
    import time as real_time

    import lamina.training.jax as room

    lm.set_backend("jax")
    x, y = blobs(400)
    net = small_net()
    opt = lm.optim.Adam(net, lr=0.01)
    lm.fit(net, lm.losses.cross_entropy, opt, (x, y), batch_size=8, steps_per_call=1, progress=False)

    class Clock:  # the loop reads the clock between steps: the 20th read is a Ctrl-C
        reads = 0

        @staticmethod
        def perf_counter():
            Clock.reads += 1
            if Clock.reads == 20:
                raise KeyboardInterrupt
            return real_time.perf_counter()

    monkeypatch.setattr(room, "time", Clock)
    with pytest.raises(KeyboardInterrupt):
        lm.fit(net, lm.losses.cross_entropy, opt, (x, y), batch_size=8, steps_per_call=1, progress=False)
    state_step = float(np.asarray(to_np(opt.state_dict()["0.weight/step"])).reshape(-1)[0])
    assert 50 < opt.steps < 100 and opt.steps == state_step


def test_fit_traces_again_when_what_forward_reads_changes(grad_backend):
    """A plain attribute forward reads (``self.scale``) or a layer without parameters added between two fits
    changes what the step computes: a compiled step traces again (jax kept the first trace before)."""

    class Scaled(lm.Module):
        def __init__(self):
            super().__init__()
            self.body, self.scale = lm.Linear(2, 3), 1.0

        def forward(self, x):
            return self.body(x) * self.scale

    x, y = blobs(64)
    net = Scaled()
    opt = lm.optim.SGD(net, lr=0.0)  # nothing moves: fit's loss is the forward's loss
    for scale in (1.0, 3.0):
        net.scale = scale
        h = lm.fit(net, lm.losses.cross_entropy, opt, (x, y), batch_size=64, shuffle=False, progress=False)
        assert h["loss"][0] == pytest.approx(lm.evaluate(net, lm.losses.cross_entropy, (x, y))["loss"], rel=1e-5)
    net.body = lm.Sequential(net.body, lm.Dropout(0.9))  # now half the batches see different masks
    h = lm.fit(net, lm.losses.cross_entropy, opt, (x, y), batch_size=8, shuffle=False, progress=False,
               callbacks=[rec := Record()])
    assert len({round(v, 6) for _, v in rec.seen}) > 4  # a fresh mask per step, not one seed for all
    assert h["loss"][0] != pytest.approx(lm.evaluate(net, lm.losses.cross_entropy, (x, y))["loss"], rel=1e-3)


@pytest.mark.parametrize("steps_per_call", [None, 1])
def test_a_second_fit_on_other_arrays_of_the_same_shape_trains_on_them(grad_backend, steps_per_call):
    """The step keeps its buffers between fits (jax: the shuffled rows on the host, the loss vector): a second
    fit on new arrays must train on the new rows, as a fresh model and optimizer resumed from the same state
    do (those have buffers of their own)."""
    (x1, y1), (x2, y2) = blobs(96, seed=1), blobs(96, seed=2)
    kw = {"batch_size": 8, "progress": False, "seed": 3}
    if grad_backend == "jax":
        kw["steps_per_call"] = steps_per_call
    lm.manual_seed(0)
    net = small_net()
    opt = lm.optim.Adam(net, lr=0.01)
    lm.fit(net, lm.losses.cross_entropy, opt, (x1, y1), **kw)
    weights, state = ({k: to_np(v).copy() for k, v in d.items()} for d in (net.state_dict(), opt.state_dict()))
    steps = opt.steps
    h = lm.fit(net, lm.losses.cross_entropy, opt, (x2, y2), **kw)["loss"]

    lm.manual_seed(0)
    fresh = small_net()
    fresh.ensure_built(x1[:8])
    fresh.load_state_dict(weights)
    fresh_opt = lm.optim.Adam(fresh, lr=0.01)
    fresh_opt.load_state_dict(state, steps=steps)
    h_fresh = lm.fit(fresh, lm.losses.cross_entropy, fresh_opt, (x2, y2), **kw)["loss"]
    np.testing.assert_allclose(h, h_fresh, rtol=1e-6)
    for key, v in fresh.state_dict().items():
        np.testing.assert_allclose(to_np(net.state_dict()[key]), to_np(v), rtol=1e-6, atol=1e-7)
