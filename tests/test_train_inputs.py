"""fit, evaluate and predict with several inputs (issue 9, as Keras takes them), and their data forms."""

import numpy as np
import pytest

import lamina as lm

from conftest import TwoInputs, to_np, weights


def arrays(n=40, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, 3)).astype(np.float32)
    b = rng.standard_normal((n, 4)).astype(np.float32)
    y = rng.standard_normal((n, 2)).astype(np.float32)
    return a, b, y


def forward_np(w, a, b):
    return a @ w["wa"] + b @ w["wb"] + w["bias"]


def sgd_by_hand(w, a, b, y, lr, batches):
    """Plain SGD on the mean squared error, gradients written out by hand, over the given row batches."""
    w = {k: v.copy() for k, v in w.items()}
    for rows in batches:
        ab, bb, yb = a[rows], b[rows], y[rows]
        g = 2 * (forward_np(w, ab, bb) - yb) / yb.size
        w = {"wa": w["wa"] - lr * ab.T @ g, "wb": w["wb"] - lr * bb.T @ g, "bias": w["bias"] - lr * g.sum(0)}
    return w


@pytest.mark.parametrize("form", ["tuple", "dict", "batches"])
def test_fit_with_two_inputs_matches_sgd_by_hand(grad_backend, form):
    a, b, y = arrays()
    net = TwoInputs()
    w0 = weights(net)
    if form == "tuple":
        data, shuffle = ((a, b), y), True
    elif form == "dict":
        data, shuffle = ({"a": a, "b": b}, y), True
    else:  # an iterable of ((x1, x2), y) batches, as Keras takes them
        data, shuffle = [((a[i:i + 16], b[i:i + 16]), y[i:i + 16]) for i in range(0, 40, 16)], False
    lm.fit(net, lm.losses.mse, lm.optim.SGD(net, lr=0.1), data, batch_size=16, epochs=2, shuffle=shuffle,
           seed=3, progress=False)
    rng = np.random.default_rng(3)
    batches = []
    for _ in range(2):
        order = rng.permutation(40) if shuffle else np.arange(40)
        batches += [order[i:i + 16] for i in range(0, 40, 16)]  # the last batch has 8 rows
    want = sgd_by_hand(w0, a, b, y, 0.1, batches)
    got = weights(net)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_evaluate_and_predict_with_two_inputs(backend):
    a, b, y = arrays()
    net = TwoInputs()
    net(a[:1], b[:1])
    w = weights(net)
    out = to_np(lm.predict(net, (a, b), batch_size=16))
    np.testing.assert_allclose(out, forward_np(w, a, b), rtol=1e-5, atol=1e-5)
    out = to_np(lm.predict(net, {"a": a, "b": b}, batch_size=16))
    np.testing.assert_allclose(out, forward_np(w, a, b), rtol=1e-5, atol=1e-5)
    out = to_np(lm.predict(net, [(a[:25], b[:25]), (a[25:], b[25:])]))  # an iterable of input batches
    np.testing.assert_allclose(out, forward_np(w, a, b), rtol=1e-5, atol=1e-5)
    res = lm.evaluate(net, lm.losses.mse, ((a, b), y), batch_size=16)
    np.testing.assert_allclose(res["loss"], ((forward_np(w, a, b) - y) ** 2).mean(), rtol=1e-5)


def test_inputs_with_different_row_counts_are_refused(grad_backend):
    a, b, y = arrays()
    net = TwoInputs()
    with pytest.raises(ValueError, match="input 1 have 39 rows but the targets have 40"):
        lm.fit(net, lm.losses.mse, lm.optim.SGD(net, lr=0.1), ((a, b[:39]), y), progress=False)


def test_evaluate_on_no_data_is_an_error_not_a_zero_loss(backend):
    """Issue 10: a mean over no rows used to be reported as loss 0.0."""
    net = lm.Linear(3, 2)
    with pytest.raises(ValueError, match="no rows"):
        lm.evaluate(net, lm.losses.mse, (np.zeros((0, 3), np.float32), np.zeros((0, 2), np.float32)))
    with pytest.raises(ValueError, match="no rows"):
        lm.evaluate(net, lm.losses.mse, [])


def test_fit_with_shuffling_matches_a_hand_loop_over_the_same_batches(grad_backend):
    """fit gathers each batch from the epoch's arrays (on jax inside the compiled step): the updates are those
    of a user's own loop (value_and_grad + Adam) over the same permutation, the short last batch included."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 5)).astype(np.float32)
    y = rng.standard_normal((50, 1)).astype(np.float32)
    lm.manual_seed(1)
    net = lm.Sequential(lm.Linear(5, 4), lm.ReLU(), lm.Linear(4, 1))
    ref = lm.Sequential(lm.Linear(5, 4), lm.ReLU(), lm.Linear(4, 1))
    ref.load_state_dict(net.state_dict())
    for k in (None, 1, 4):
        history = lm.fit(net, lm.losses.mse, opt := lm.optim.Adam(net, lr=0.01), (x, y), batch_size=8, epochs=2,
                         seed=5, steps_per_call=k, progress=False)
        grad = lm.value_and_grad(lambda m, xb, yb: lm.losses.mse(m(xb), yb))
        ref_opt = lm.optim.Adam(ref, lr=0.01)
        order_rng = np.random.default_rng(5)
        mean_losses = []
        for _ in range(2):
            order = order_rng.permutation(50)
            total = 0.0
            for i in range(0, 50, 8):
                loss, g = grad(ref, x[order[i:i + 8]], y[order[i:i + 8]])
                ref_opt.step(g)
                total += float(to_np(loss)) * len(order[i:i + 8])
            mean_losses.append(total / 50)
        assert opt.steps == 14
        np.testing.assert_allclose(history["loss"], mean_losses, rtol=1e-5, err_msg=f"k={k}")
        for key, v in weights(ref).items():
            np.testing.assert_allclose(weights(net)[key], v, rtol=1e-5, atol=1e-6, err_msg=f"k={k} {key}")


def test_a_batch_callback_sees_the_weights_of_each_step(grad_backend):
    """On jax the weights stay on the device during an epoch; a batch callback still reads each step's."""
    x = np.random.default_rng(0).standard_normal((24, 3)).astype(np.float32)
    y = np.zeros((24, 1), np.float32)
    net = lm.Linear(3, 1)
    seen = []

    class Watch(lm.Callback):
        def on_batch_end(self, batch, logs):
            seen.append(to_np(net.get_parameter("weight").value).copy())

    lm.fit(net, lm.losses.mse, lm.optim.SGD(net, lr=0.1), (x, y), batch_size=8, callbacks=[Watch()], progress=False)
    assert len(seen) == 3
    assert not np.allclose(seen[0], seen[1]) and not np.allclose(seen[1], seen[2])
    np.testing.assert_array_equal(seen[2], to_np(net.get_parameter("weight").value))
