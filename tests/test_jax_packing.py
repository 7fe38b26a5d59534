"""jax ``fit`` with a small model's values packed into one vector per dtype (training/jax_packing.py): the same
updates, bit for bit, as the unpacked step; nothing the user holds is donated; the choice of when to pack."""

import numpy as np
import pytest

import lamina as lm

from conftest import BACKENDS, to_np, weights

pytestmark = pytest.mark.skipif("jax" not in BACKENDS, reason="jax is not installed")


def _data(n=72, d=6, seed=0):  # 72 rows: 9 batches of 8 (a partial one with batch_size=7)
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, d)).astype(np.float32)
    return x, (x[:, :1] * 2 - x[:, 1:2] + 0.1 * r.normal(size=(n, 1))).astype(np.float32)


def _net(norm=False):
    lm.manual_seed(0)
    layers = [lm.Linear(6, 8)] + ([lm.BatchNorm1d(8)] if norm else []) + [lm.ReLU(), lm.Linear(8, 1)]
    return lm.Sequential(*layers)


def _spy(monkeypatch, limit=None):
    """Records the Packing each epoch used (None: unpacked); ``limit`` replaces PACK_BELOW_BYTES."""
    import lamina.training.jax as room
    import lamina.training.jax_packing as packing

    if limit is not None:
        monkeypatch.setattr(packing, "PACK_BELOW_BYTES", limit)
    used = []
    original = room.packing_for

    def spying(tree, known):
        pk = original(tree, known)
        used.append(pk)
        return pk

    monkeypatch.setattr(room, "packing_for", spying)
    return used


def _train(monkeypatch, limit, norm=False, **kw):
    lm.set_backend("jax")
    used = _spy(monkeypatch, limit)
    net = _net(norm)
    opt = lm.optim.Adam(net, lr=0.01, weight_decay=0.01)
    x, y = _data()
    args = dict(batch_size=7, progress=False, steps_per_call=1, epochs=2) | kw
    hist = lm.fit(net, lm.losses.mse, opt, (x, y), **args)
    state = {k: np.asarray(v) for k, v in opt.state_dict().items()}
    monkeypatch.undo()
    return weights(net), state, hist.history, used


@pytest.mark.parametrize("norm", [False, True], ids=["mlp", "with BatchNorm buffers"])
@pytest.mark.parametrize("metrics", [False, True], ids=["no metrics", "metrics"])
def test_packed_fit_updates_as_the_unpacked_fit_bit_for_bit(monkeypatch, norm, metrics):
    """Parameters, buffers (BatchNorm's running statistics, float32, and its int32 count: two vectors), the Adam
    state and every epoch's loss are the same bits with and without packing, over 2 epochs of 11 steps with a
    partial last batch."""
    kw = dict(metrics=[lm.losses.mse]) if metrics else {}
    packed = _train(monkeypatch, None, norm, **kw)
    plain = _train(monkeypatch, -1, norm, **kw)
    assert packed[3] and all(pk is not None for pk in packed[3])  # packed: every epoch
    assert len(packed[3][0].dtypes) == (2 if norm else 1)
    assert plain[3] and all(pk is None for pk in plain[3])
    for mine, other in zip(packed[:3], plain[:3]):
        assert mine.keys() == other.keys()
        for k in mine:
            np.testing.assert_array_equal(mine[k], other[k], err_msg=k)


def test_packed_fit_matches_a_users_own_loop(monkeypatch):
    """Against an independent path: the eager engine (``lm.value_and_grad`` + ``opt.step``) over the same
    shuffled batches (``fit`` shuffles with ``np.random.default_rng(seed)``), within float32 rounding."""
    got, _, _, used = _train(monkeypatch, None, epochs=1)
    assert used[0] is not None
    lm.set_backend("jax")
    net = _net()
    opt = lm.optim.Adam(net, lr=0.01, weight_decay=0.01)
    x, y = _data()
    order = np.random.default_rng(0).permutation(len(x))
    grad = lm.value_and_grad(lambda m, xb, yb: lm.losses.mse(m(xb), yb))
    for s in range(0, len(x), 7):
        idx = order[s:s + 7]
        _, g = grad(net, x[idx], y[idx])
        opt.step(g)
    want = weights(net)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_packed_fit_donates_nothing_the_user_holds(monkeypatch):
    """The values the model showed, and a ``state_dict`` of the optimizer taken before, stay valid and unchanged
    through a packed fit (it packs them into new buffers: no protective copy is needed); the model trains."""
    lm.set_backend("jax")
    used = _spy(monkeypatch)
    net = _net()
    opt = lm.optim.Adam(net, lr=0.01)
    x, y = _data()
    lm.fit(net, lm.losses.mse, opt, (x, y), batch_size=8, progress=False, steps_per_call=1)
    held = {k: p.value for k, p in net.named_parameters()}
    saved = {k: v.copy() for k, v in ((k, np.array(v)) for k, v in held.items())}
    moments = opt.state_dict()
    moments_then = {k: np.array(v) for k, v in moments.items()}
    lm.fit(net, lm.losses.mse, opt, (x, y), batch_size=8, progress=False, steps_per_call=1)
    assert len(used) == 2 and all(pk is not None for pk in used)
    for k, v in held.items():
        assert not v.is_deleted()
        np.testing.assert_array_equal(np.asarray(v), saved[k])
        assert not np.array_equal(to_np(net.get_parameter(k).value), saved[k])  # it trained
    for k, v in moments.items():
        np.testing.assert_array_equal(np.asarray(v), moments_then[k])


def test_packing_is_chosen_for_single_steps_of_small_models_only(monkeypatch):
    """Packed: one step per call, no batch callback, values up to PACK_BELOW_BYTES on one device. Unpacked:
    grouped calls (a packed scan is slower), a batch callback (the model is published after every call), a
    model above the limit."""
    from lamina.training.jax_packing import PACK_BELOW_BYTES

    lm.set_backend("jax")
    x, y = _data()

    def packings(net, **kw):
        used = _spy(monkeypatch)
        lm.fit(net, lm.losses.mse, lm.optim.Adam(net), (x, y), batch_size=8, progress=False, **kw)
        monkeypatch.undo()
        return [pk is not None for pk in used]

    class Batch(lm.Callback):
        def on_batch_end(self, batch, logs):
            pass

    assert packings(_net(), steps_per_call=1) == [True]
    assert packings(_net(), steps_per_call=4) == []  # (not even looked at)
    assert packings(_net(), steps_per_call=1, callbacks=[Batch()]) == []
    wide = lm.Sequential(lm.Linear(6, 1024), lm.ReLU(), lm.Linear(1024, 1))  # 8,193 values, 3 slots: 98 KB
    assert 4 * 3 * (6 * 1024 + 1024 + 1024 + 1) > PACK_BELOW_BYTES
    assert packings(wide, steps_per_call=1) == [False]

