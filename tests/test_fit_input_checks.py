"""fit refuses what it cannot train on before anything changes: training data with no rows (a loss of 0.0 used to
be logged), and an optimizer made for another model's parameters (torch and tensorflow trained nothing, jax failed
inside the compiled step); an optimizer over a part of the model still trains that part, in fit and in a user's
own loop."""

import numpy as np
import pytest

import lamina as lm

from conftest import to_np

NO_ROWS = r"fit: the training data has no rows \(0 batches\), so there is nothing to train on"
OTHER = "fit: the optimizer was made for other parameters"


def data(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4)).astype(np.float32), rng.standard_normal((n, 3)).astype(np.float32)


def values(model) -> dict:
    return {k: to_np(v).copy() for k, v in model.state_dict().items()}


def assert_same(before: dict, model) -> None:
    after = values(model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)


class Events(lm.Callback):
    """Records every event it sees."""

    def __init__(self):
        self.seen = []

    def on_train_begin(self, logs):
        self.seen.append("train_begin")

    def on_epoch_begin(self, epoch, logs):
        self.seen.append("epoch_begin")

    def on_batch_end(self, batch, logs):
        self.seen.append("batch_end")

    def on_epoch_end(self, epoch, logs):
        self.seen.append("epoch_end")

    def on_train_end(self, logs):
        self.seen.append("train_end")


class TwoInputs(lm.Module):
    def __init__(self):
        super().__init__()
        self.w = lm.Parameter((4, 3), init=lm.init.normal())

    def forward(self, a, b):
        return (a + b) @ self.w


# ----- data with no rows -----------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["arrays", "several inputs", "empty list", "empty validation"])
def test_fit_refuses_data_with_no_rows_before_anything_changes(grad_backend, form):
    net = lm.Linear(4, 3)
    opt = lm.optim.Adam(net)
    x, y = data()
    before, events = values(net), Events()
    train, val, match = (x[:0], y[:0]), None, NO_ROWS
    if form == "several inputs":
        net = TwoInputs()
        opt, before = lm.optim.Adam(net), values(net)
        train = ((x[:0], x[:0]), y[:0])
    elif form == "empty list":
        train = []
    elif form == "empty validation":
        train, val = (x, y), (x[:0], y[:0])
        match = r"fit: the validation data has no rows \(0 batches\), so there is no mean loss"
    with pytest.raises(ValueError, match=match):
        lm.fit(net, lm.losses.mse, opt, train, validation_data=val, callbacks=[events], epochs=2, progress=False)
    assert opt.steps == 0 and events.seen == []
    assert_same(before, net)


def test_fit_and_evaluate_word_no_rows_alike(grad_backend):
    net = lm.Linear(4, 3)
    x, y = data()
    with pytest.raises(ValueError, match=r"evaluate: the data has no rows \(0 batches\).*pass at least one"):
        lm.evaluate(net, lm.losses.mse, (x[:0], y[:0]))
    with pytest.raises(ValueError, match=NO_ROWS + r".*pass at least one \(x, y\) batch"):
        lm.fit(net, lm.losses.mse, lm.optim.SGD(net), (x[:0], y[:0]), progress=False)


def test_fit_on_a_generator_that_gives_nothing_is_an_error_and_counts_no_step(grad_backend):
    """A generator is known empty only once it has run: the epoch began, but no step was taken."""
    net = lm.Linear(4, 3)
    opt = lm.optim.Adam(net)
    before, events = values(net), Events()
    with pytest.raises(ValueError, match=NO_ROWS):
        lm.fit(net, lm.losses.mse, opt, iter([]), callbacks=[events], progress=False)
    assert opt.steps == 0 and "batch_end" not in events.seen and "epoch_end" not in events.seen
    assert_same(before, net)


def test_a_generator_used_up_by_the_first_epoch_stops_training_with_a_warning(grad_backend):
    """As Keras ("your input ran out of data"): the later epochs are not logged as a loss of 0.0."""
    x, y = data(12)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)]
    lm.manual_seed(3)
    net = lm.Linear(4, 3)
    twin = lm.Linear(4, 3)
    twin.load_state_dict(net.state_dict())
    ref = lm.fit(twin, lm.losses.mse, lm.optim.SGD(twin, lr=0.1), batches, epochs=1, progress=False)
    opt, events = lm.optim.SGD(net, lr=0.1), Events()
    with pytest.warns(RuntimeWarning, match="fit: the training data ran out: epoch 2 got no batches"):
        hist = lm.fit(net, lm.losses.mse, opt, iter(batches), epochs=3, callbacks=[events], progress=False)
    assert hist.epochs == [0] and opt.steps == 3
    np.testing.assert_allclose(hist["loss"], ref["loss"], rtol=1e-6)
    assert events.seen.count("epoch_end") == 1 and events.seen[-1] == "train_end"
    assert_same(values(twin), net)


# ----- an optimizer made for another model -----------------------------------------------------------------
@pytest.mark.parametrize("other", ["same architecture", "other architecture", "lazy"])
def test_fit_refuses_an_optimizer_made_for_another_model(grad_backend, other):
    x, y = data()
    make = {"same architecture": lambda: lm.Linear(4, 3), "lazy": lambda: lm.Linear(3),
            "other architecture": lambda: lm.Sequential(lm.Linear(4, 5), lm.Linear(5, 3))}[other]
    old, net = make(), lm.Linear(4, 3)  # the notebook cell that makes the model was run again
    opt, events = lm.optim.Adam(old), Events()
    before_old = values(old) if other != "lazy" else {}
    before = values(net)
    with pytest.raises(ValueError, match=OTHER + r".*lm\.optim\.Adam\(model\)"):
        lm.fit(net, lm.losses.mse, opt, (x, y), callbacks=[events], progress=False)
    assert opt.steps == 0 and events.seen == []
    assert_same(before, net)
    if other != "lazy":
        assert_same(before_old, old)


class Dense(lm.Module):
    """A lazy layer whose build hook makes its parameters: before its first call it has none."""

    def __init__(self, units):
        super().__init__()
        self.units = units

    def build(self, input_shape):
        self.weight = lm.Parameter((input_shape[-1], self.units), init=lm.init.normal())

    def forward(self, X):
        return X @ self.weight


def test_an_optimizer_of_an_unbuilt_other_model_is_refused_once_the_model_is_built(grad_backend):
    """Its parameters do not exist yet, so it is judged after the first build, still before any step."""
    x, y = data()
    net = Dense(3)
    opt = lm.optim.Adam(Dense(3))
    with pytest.raises(ValueError, match="fit: the optimizer has no trainable parameters.*lm.optim.Adam"):
        lm.fit(net, lm.losses.mse, opt, (x, y), progress=False)
    assert opt.steps == 0
    # ... while an optimizer made for the unbuilt model itself trains it (the ordinary lazy case)
    net = Dense(3)
    opt = lm.optim.SGD(net, lr=0.1)
    lm.fit(net, lm.losses.mse, opt, (x, y), batch_size=8, shuffle=False, progress=False)
    assert opt.steps == 1


def hand_sgd_two_linears(w0, b0, w1, b1, x, y, lr):
    """One SGD step on the second of two Linear layers (mse over all elements), by hand in float64."""
    h = x @ w0 + b0
    out = h @ w1 + b1
    d = 2 * (out - y) / out.size
    return w1 - lr * (h.T @ d), b1 - lr * d.sum(0)


def test_an_optimizer_over_a_part_of_the_model_trains_that_part(grad_backend):
    """lm.optim.SGD(model[1]) leaves model[0] as it is: the update of model[1] is a hand-computed SGD step."""
    x, y = data()
    net = lm.Sequential(lm.Linear(4, 5), lm.Linear(5, 3))
    w = {k: v.astype(np.float64) for k, v in values(net).items()}
    lm.fit(net, lm.losses.mse, lm.optim.SGD(net[1], lr=0.1), (x, y), batch_size=8, shuffle=False, progress=False)
    after = values(net)
    want_w, want_b = hand_sgd_two_linears(w["0.weight"], w["0.bias"], w["1.weight"], w["1.bias"], x, y, 0.1)
    np.testing.assert_array_equal(after["0.weight"], w["0.weight"].astype(np.float32))
    np.testing.assert_array_equal(after["0.bias"], w["0.bias"].astype(np.float32))
    np.testing.assert_allclose(after["1.weight"], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after["1.bias"], want_b, rtol=1e-5, atol=1e-6)


# ----- a user's own loop: opt.step(grads) -----------------------------------------------------------------------
def grads_of(model, x, y):
    return lm.value_and_grad(lambda m, xb, yb: lm.losses.mse(m(xb), yb))(model, x, y)[1]


def test_step_with_the_gradients_of_another_model_says_so(grad_backend):
    x, y = data()
    other = lm.Sequential(lm.Linear(4, 5), lm.Linear(5, 3))
    net = lm.Linear(4, 3)
    opt = lm.optim.Adam(net)
    before = values(net)
    with pytest.raises(ValueError, match=r"Adam.step\(\): the optimizer was made for other parameters than those of "
                                         r"the gradients: it updates \['weight', 'bias'\], the gradients are for "
                                         r"\['0.weight', .*lm.optim.Adam\(model\)"):
        opt.step(grads_of(other, x, y))
    assert opt.steps == 0
    assert_same(before, net)
    # a gradient missing for some of its parameters is still named as such
    g = grads_of(net, x, y)
    with pytest.raises(ValueError, match=r"no gradient for \['bias'\]; compute them first"):
        opt.step({"weight": g["weight"]})


def test_step_of_an_optimizer_over_a_part_takes_the_whole_model_gradients(grad_backend):
    """lm.optim.SGD(model[1]) names its parameters 'weight', 'bias'; the gradients of the model call them
    '1.weight', '1.bias': step finds them by their path in the model, and updates that part only."""
    x, y = data()
    net = lm.Sequential(lm.Linear(4, 5), lm.Linear(5, 3))
    w = {k: v.astype(np.float64) for k, v in values(net).items()}
    opt = lm.optim.SGD(net[1], lr=0.1)
    opt.step(grads_of(net, x, y))
    after = values(net)
    want_w, want_b = hand_sgd_two_linears(w["0.weight"], w["0.bias"], w["1.weight"], w["1.bias"], x, y, 0.1)
    np.testing.assert_array_equal(after["0.weight"], w["0.weight"].astype(np.float32))
    np.testing.assert_allclose(after["1.weight"], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after["1.bias"], want_b, rtol=1e-5, atol=1e-6)
    # the part's own gradients (keyed 'weight', 'bias') work as before
    opt.step(grads_of(net[1], np.asarray(x @ w["0.weight"] + w["0.bias"], np.float32), y))
    assert opt.steps == 2
