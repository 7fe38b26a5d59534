"""What is particular to the tensorflow backend (everything backend-neutral runs on it through the shared fixture
in conftest.py): tf.Variable parameters, functional_call under tf.function, the XLA train step (its scalars in
a variable, steps grouped in a tf.while_loop, the epoch's rows on the device), the NumPy methods the textbook's
layers call on tf.Tensor, the Array-API shim, and the issue's example end to end. References: the numpy
backend with the same seed, NumPy, finite differences, a hand-written tf.function, the eager step."""

import numpy as np
import pytest

import lamina as lm

from conftest import CenteredLayer, MyLinear, numeric_grad, rand

tf = pytest.importorskip("tensorflow")


def textbook_net():
    lm.manual_seed(0)
    return lm.Sequential(MyLinear(64, 8), CenteredLayer(), lm.Linear(1))


@pytest.fixture(autouse=True)
def _tensorflow():
    lm.set_backend("tensorflow")
    yield


def test_parameters_are_variables_and_outputs_tensors_with_the_numpy_backends_numbers():
    x = rand(4, 64)
    lm.set_backend("numpy")
    ref = textbook_net()
    want = ref(x)
    lm.set_backend("tensorflow")
    net = textbook_net()
    y = net(x)
    assert isinstance(y, tf.Tensor) and isinstance(net[0].weight, tf.Variable)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
    for (k, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=k)


def test_gradients_match_finite_differences():
    net = textbook_net()
    x = rand(4, 64)
    h = np.asarray(net[1](net[0](x)), np.float64)
    b = float(net[2].get_parameter("bias").numpy()[0])
    _, grads = lm.value_and_grad(lambda m, x: (m(x) ** 2).sum())(net, x)
    num = numeric_grad(lambda W: float((((h @ W) + b) ** 2).sum()),
                       net[2].get_parameter("weight").numpy().astype(np.float64))
    np.testing.assert_allclose(grads["2.weight"].numpy(), num, rtol=1e-3, atol=1e-3)


def test_functional_call_under_tf_function_is_traced_once_and_leaves_the_model_alone():
    net = textbook_net()
    x = tf.constant(rand(4, 64))
    net(x)
    params = {k: tf.convert_to_tensor(v) * 2.0 for k, v in net.state_dict().items()}
    traces = []

    @tf.function
    def pure(ps, x):
        traces.append(1)
        return lm.functional_call(net, ps, x)

    want = lm.functional_call(net, params, x)  # eager
    np.testing.assert_allclose(pure(params, x).numpy(), want.numpy(), rtol=1e-6)
    np.testing.assert_allclose(pure(params, x + 1.0).numpy(), lm.functional_call(net, params, x + 1.0).numpy(),
                               rtol=1e-6)
    assert len(traces) == 1
    # the model's own variables are untouched, and it still computes with them
    w = net.get_parameter("0.weight").numpy()
    np.testing.assert_array_equal(net[0].weight.numpy(), w)
    assert not np.allclose(net(x).numpy(), want.numpy())


def test_gradients_through_functional_call_under_tf_function():
    net = textbook_net()
    x = tf.constant(rand(4, 64))
    net(x)
    params = {k: tf.convert_to_tensor(v) for k, v in net.state_dict().items()}

    @tf.function
    def grads(ps, x):
        with tf.GradientTape() as tape:
            tape.watch(ps)
            loss = tf.reduce_sum(lm.functional_call(net, ps, x) ** 2)
        return tape.gradient(loss, ps)

    _, want = lm.value_and_grad(lambda m, x: (m(x) ** 2).sum())(net, x)
    got = grads(params, x)
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("compile", [None, True, False], ids=["graph", "xla", "eager"])
def test_the_train_step_matches_a_hand_written_tf_step(compile):
    """lm.fit's step (graph mode, XLA, eager) against tf.GradientTape + the Adam rule written out, 5 steps."""
    rng = np.random.default_rng(1)
    X = rng.random((40, 64)).astype("float32")
    Y = X[:, :1] * 2.0
    net = textbook_net()
    net(X[:2])
    ws = [tf.Variable(v.numpy()) for v in net.state_dict().values()]
    ms = [tf.zeros_like(w) for w in ws]
    vs = [tf.zeros_like(w) for w in ws]
    lm.fit(net, lm.losses.mse, lm.optim.Adam(net, lr=1e-2), (X, Y), epochs=1, batch_size=8, shuffle=False,
           compile=compile, progress=False)
    for t in range(1, 6):
        xb, yb = X[(t - 1) * 8:t * 8], Y[(t - 1) * 8:t * 8]
        with tf.GradientTape() as tape:
            h = tf.nn.relu(xb @ ws[0] + ws[1])
            h = h - tf.reduce_mean(h)
            loss = tf.reduce_mean((h @ ws[2] + ws[3] - yb) ** 2)
        for i, g in enumerate(tape.gradient(loss, ws)):
            ms[i] = 0.9 * ms[i] + 0.1 * g
            vs[i] = 0.999 * vs[i] + 0.001 * g * g
            ws[i].assign_sub(1e-2 * (ms[i] / (1 - 0.9**t)) / (tf.sqrt(vs[i] / (1 - 0.999**t)) + 1e-8))
    for (k, v), w in zip(net.state_dict().items(), ws):
        np.testing.assert_allclose(v.numpy(), w.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


def test_the_compiled_step_is_traced_once_across_learning_rates_and_seeds():
    """The learning rate, bias corrections and the dropout seed enter the step as data: no retrace."""
    from lamina.training import trainer_for

    net = lm.Sequential(lm.Linear(64, 8), lm.Dropout(0.5), lm.Linear(1))
    x, y = tf.constant(rand(16, 64)), tf.constant(rand(16, 1, seed=1))
    net(x)
    opt = lm.optim.Adam(net, lr=1e-2)
    step = trainer_for(lm.get_backend("tensorflow")).make_step(net, lm.losses.mse, opt, None)
    losses = [float(step(x, y, lr)[0]) for lr in (1e-2, 5e-3, 1e-3, 1e-4)]
    assert step.compiled().experimental_get_tracing_count() == 1
    assert len(set(losses)) == 4  # new masks, moving weights


def test_textbook_array_methods_on_tensors_and_variables():
    """The methods the textbook's layers call on their inputs (X.mean(), X.sum(), ...), on tf.Tensor and on the
    parameters' tf.Variables, against NumPy."""
    a = rand(3, 4)
    for x in (tf.constant(a), tf.Variable(a)):
        np.testing.assert_allclose(x.mean().numpy(), a.mean(), rtol=1e-5)
        np.testing.assert_allclose(x.sum().numpy(), a.sum(), rtol=1e-5)
        np.testing.assert_allclose(x.max().numpy(), a.max())
        np.testing.assert_allclose(x.std().numpy(), a.std(), rtol=1e-5)
        np.testing.assert_allclose(x.reshape(4, 3).numpy(), a.reshape(4, 3))
        np.testing.assert_allclose(x.T.numpy(), a.T)
        np.testing.assert_allclose((+x).numpy(), a)
        assert x.ndim == 2 and x.size == 12


def test_matmul_with_vectors_works_as_numpy_and_matrices_as_before():
    """TensorFlow's @ needs two matrices; the backend makes it NumPy's for 1-d operands (only when the native
    operator refused: a matrix product is unchanged)."""
    v, m = rand(4), rand(4, 3, seed=1)
    tv, tm, var = tf.constant(v), tf.constant(m), tf.Variable(v)
    np.testing.assert_allclose((tv @ tv).numpy(), v @ v, rtol=1e-6)
    np.testing.assert_allclose((var @ tm).numpy(), v @ m, rtol=1e-6)
    np.testing.assert_allclose((tm.T @ var).numpy(), m.T @ v, rtol=1e-6)
    np.testing.assert_allclose((tm.T @ tm).numpy(), m.T @ m, rtol=1e-6)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        tm @ tm  # (4, 3) @ (4, 3): still an error


def test_the_namespace_is_an_array_api_namespace():
    xp = lm.get_backend("tensorflow").xp
    assert xp.__array_api_version__ == "2023.12"
    assert xp.asarray(2.7, dtype=tf.int64).numpy() == 2  # NumPy's conversion
    assert xp.asarray([1, 2]).dtype == tf.int64 and xp.asarray([1.5]).dtype == tf.float32


def test_a_recurrent_layer_keeps_a_static_time_axis_under_tf_function():
    """tf.while_loop's stacked outputs lose the time axis' length; the scan sets it back, so a layer after it
    can reshape with x.shape (a bug: MultiHeadAttention after an LSTM failed to trace)."""
    net = lm.Sequential(lm.LSTM(8))
    x = rand(2, 5, 3)
    net(x)
    shapes = []

    @tf.function
    def f(x):
        out, _ = net[0](x)
        shapes.append(tuple(out.shape))
        return out

    f(tf.constant(x))
    assert shapes == [(2, 5, 8)]


def test_issue_example_end_to_end():
    rng = np.random.default_rng(1)
    X = rng.random((256, 64)).astype("float32")
    Y = X[:, :1] * 2.0
    net = textbook_net()
    hist = lm.fit(net, lm.losses.mse, lm.optim.Adam(net, lr=1e-2), (X, Y), epochs=5, progress=False)
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]


class _Losses(lm.Callback):
    """Every step's loss; at batch ``slow_at`` (if given) sets the learning rate to ``slow_lr``."""

    def __init__(self, slow_at=None, slow_lr=None):
        self.seen, self.slow_at, self.slow_lr = [], slow_at, slow_lr

    def on_batch_end(self, batch, logs):
        self.seen.append(logs["loss"])
        if batch == self.slow_at:
            self.trainer.optimizer.lr = self.slow_lr


@pytest.mark.parametrize(("steps_per_call", "form"), [(1, "arrays"), (16, "arrays"), (4, "batches")])
def test_fit_follows_a_numpy_sgd_loop_across_grouped_calls_and_a_changed_learning_rate(steps_per_call, form):
    """300 steps of batch 1 (the scalars' ring of 256 rows wraps), the learning rate set by a batch callback
    after step 96 (the end of a call for 1, 4 and 16 steps per call; rows written ahead for the old rate must
    not be used): one step per call, 16 per call (a tf.while_loop over the epoch's rows on the device) and 4
    per call over a list of batches (step.many). Every step's loss reaches the callback; the weights and the
    losses follow the same loop in NumPy (float64)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((150, 3)).astype("float32")
    Y = (X @ np.array([[1.0], [-2.0], [0.5]]) + 0.3 + rng.standard_normal((150, 1))).astype("float32")  # noisy:
    lm.manual_seed(0)  # SGD keeps moving, so each step's learning rate shows in the weights
    net = lm.Linear(3, 1)
    net(X[:1])
    w, b = (net.get_parameter(k).numpy().astype(np.float64) for k in ("weight", "bias"))
    opt = lm.optim.SGD(net, lr=0.05)
    record = _Losses(slow_at=95, slow_lr=0.02)
    data = (X, Y) if form == "arrays" else [(X[i:i + 1], Y[i:i + 1]) for i in range(150)]
    lm.fit(net, lm.losses.mse, opt, data, epochs=2, batch_size=1, shuffle=False, steps_per_call=steps_per_call,
           callbacks=[record], progress=False)
    want = []
    for s in range(300):
        x, y = X[s % 150:s % 150 + 1].astype(np.float64), Y[s % 150:s % 150 + 1].astype(np.float64)
        err = x @ w + b - y
        want.append(float((err**2).mean()))
        lr = 0.05 if s < 96 else 0.02
        w, b = w - lr * 2 * x.T @ err / err.size, b - lr * 2 * err.sum(0) / err.size
    assert opt.steps == 300 and len(record.seen) == 300
    np.testing.assert_allclose(record.seen, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(net.get_parameter("weight").numpy(), w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.get_parameter("bias").numpy(), b, rtol=1e-4, atol=1e-5)


def test_grouped_steps_carry_batchnorm_buffers_and_match_steps_run_one_by_one():
    """Shuffled, with BatchNorm's running statistics carried through the loop: 16 steps per call give every
    step's loss, the weights and the buffers of one step per call."""
    rng = np.random.default_rng(2)
    X, Y = rng.standard_normal((200, 6)).astype("float32"), rng.integers(0, 3, 200)
    results = []
    for k in (1, 16):
        lm.manual_seed(0)
        # no bias before the BatchNorm: its gradient is rounding noise, which Adam would turn into steps of lr
        net = lm.Sequential(lm.Linear(6, 16, bias=False), lm.BatchNorm1d(16), lm.ReLU(), lm.Linear(3))
        opt = lm.optim.Adam(net, lr=0.01)
        record = _Losses()
        lm.fit(net, lm.losses.cross_entropy, opt, (X, Y), epochs=2, batch_size=8, steps_per_call=k,
               callbacks=[record], progress=False)
        results.append((record.seen, {n: v.numpy() for n, v in net.state_dict().items()}, opt.steps))
    (seen1, w1, s1), (seen16, w16, s16) = results
    assert s1 == s16 == 50 and len(seen1) == len(seen16) == 50
    np.testing.assert_allclose(seen16, seen1, rtol=1e-5, atol=1e-6)
    assert "1.running_mean" in w1
    for key in w1:
        np.testing.assert_allclose(w16[key], w1[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_loaded_optimizer_state_reaches_the_compiled_step():
    """Loading zero moments and step 0 into the optimizer of a model already trained by fit: the next update
    is Adam's first, lr * g / (|g| + eps), which is lr in size for each element (the compiled step had kept
    the old moments: a bug)."""
    X = np.random.default_rng(0).random((64, 4)).astype("float32")
    lm.manual_seed(0)
    net = lm.Linear(4, 1)
    opt = lm.optim.Adam(net, lr=0.1)
    lm.fit(net, lm.losses.mse, opt, (X, X[:, :1]), batch_size=16, shuffle=False, progress=False)
    before = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    opt.load_state_dict({k: np.zeros_like(np.asarray(v)) for k, v in opt.state_dict().items()})
    lm.fit(net, lm.losses.mse, opt, (X[:16], X[:16, :1]), batch_size=16, progress=False)
    for k, v in net.state_dict().items():
        np.testing.assert_allclose(np.abs(v.numpy() - before[k]), 0.1, rtol=1e-5, err_msg=k)
    assert int(np.asarray(opt.state_dict()["weight/step"]).reshape(-1)[0]) == 1


@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_the_epoch_on_the_device_takes_fits_shuffled_batches(steps_per_call):
    """fit over arrays slices each batch on the device through the epoch's order (step.epoch); the eager step
    (compile=False) gets the batches fit cuts on the host. Shuffled, 44 rows in batches of 8 (a last batch of
    4), 3 epochs: the same losses step by step and the same weights."""
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((44, 5)).astype("float32"), rng.standard_normal((44, 2)).astype("float32")
    runs = []
    for compile in (None, False):
        lm.manual_seed(0)
        net = lm.Sequential(lm.Linear(5, 8), lm.Tanh(), lm.Linear(2))
        record = _Losses()
        lm.fit(net, lm.losses.mse, lm.optim.Adam(net, lr=0.05), (X, Y), epochs=3, batch_size=8, seed=7,
               compile=compile, steps_per_call=steps_per_call, callbacks=[record], progress=False)
        runs.append((record.seen, {k: v.numpy() for k, v in net.state_dict().items()}))
    (seen, w), (seen_eager, w_eager) = runs
    assert len(seen) == len(seen_eager) == 18
    np.testing.assert_allclose(seen, seen_eager, rtol=1e-5, atol=1e-6)
    for k in w:
        np.testing.assert_allclose(w[k], w_eager[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_reshape_takes_sizes_unknown_while_tracing_at_run_time():
    """x.reshape(x.shape[0], -1) under a trace with the batch axis None (lm.export's input_shape): the None is
    the run-time size of that axis, and the -1 comes from the known sizes (the result keeps a static last
    axis for the layer after it); NumPy's results on batches of 1 and 4."""
    xp = lm.get_backend("tensorflow").xp
    shapes = []

    def f(a):
        outs = (a.reshape(a.shape[0], -1), xp.reshape(a, (a.shape[0], 3, -1)), a.reshape((a.shape[0], a.shape[1], 6)))
        shapes.append([tuple(o.shape) for o in outs])
        return outs

    f = tf.function(f, input_signature=[tf.TensorSpec((None, 2, 3, 2))], autograph=False)
    for n in (1, 4):
        a = rand(n, 2, 3, 2)
        for got, want in zip(f(tf.constant(a)), (a.reshape(n, -1), a.reshape(n, 3, -1), a.reshape(n, 2, 6))):
            np.testing.assert_array_equal(got.numpy(), want)
    assert shapes == [[(None, 12), (None, 3, 4), (None, 2, 6)]]
