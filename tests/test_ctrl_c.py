"""A real Ctrl-C (SIGINT, delivered with ``signal.raise_signal`` at a chosen point) while jax trains: inside
``fit`` it waits until the step's books agree (``context.interrupts_deferred``), and in a user's own loop the
engine finishes the update it interrupted. Either way, afterwards every value is readable, the optimizer's two
counts agree (``opt.steps`` and the ``step`` entries of its state), the model holds exactly ``opt.steps`` steps
(the same values as an uninterrupted hand loop, ``lm.value_and_grad`` + ``opt.step``, over the same batches),
and training goes on. The points were found by a helper sending real SIGINTs at random moments (17 of 336
trials broke the model or its counts before this)."""

from __future__ import annotations

import signal

import numpy as np
import pytest

import lamina as lm

from conftest import BACKENDS, to_np

pytestmark = pytest.mark.skipif("jax" not in BACKENDS, reason="jax not selected")

N, B = 48, 8


def _xy():
    r = np.random.default_rng(0)
    return r.normal(size=(N, 4)).astype(np.float32), r.normal(size=(N, 1)).astype(np.float32)


def _net():
    lm.manual_seed(0)
    net = lm.Sequential(lm.Linear(4, 8), lm.ReLU(), lm.Linear(8, 1))
    return net, lm.optim.Adam(net, lr=0.01)


class _Batch(lm.Callback):
    def on_batch_end(self, batch, logs):
        pass


PATHS = {  # fit's keywords ("batches": a list of batches, not arrays); "loop": a user's own loop
    "one call per step, a metric": dict(steps_per_call=1, metrics=[lm.losses.mse]),
    "back to back": dict(steps_per_call=1),
    "back to back, grouped": dict(steps_per_call=2),
    "a batch callback": dict(steps_per_call=1, callbacks=[_Batch()]),
    "a list of batches": dict(steps_per_call=1, batches=True),
    "a list of batches, grouped": dict(steps_per_call=2, batches=True),
    "a user's own loop": "loop",
}


def _signal_at(monkeypatch, where: str, nth: int) -> list:
    """Deliver SIGINT the ``nth`` time ``where`` runs: "after a compiled call" (as ``_kept`` returns: a Ctrl-C
    that came during the call), "inside publish" (as a parameter's new value is stored), "carry_in"."""
    import lamina.training.jax as room
    from lamina.parameter import Parameter

    hits = [0]

    def fire():
        hits[0] += 1
        if hits[0] == nth:
            signal.raise_signal(signal.SIGINT)

    if where == "after a compiled call":
        original = room._kept

        def kept(run, args, into, steps):
            out = original(run, args, into, steps)
            fire()
            return out

        monkeypatch.setattr(room, "_kept", kept)
    elif where == "inside publish":
        original = Parameter.set_value

        def set_value(self, array, *, trusted=False):
            original(self, array, trusted=trusted)
            fire()

        monkeypatch.setattr(Parameter, "set_value", set_value)
    else:
        original = room.carry_in

        def carry_in(attrs, targets):
            fire()
            return original(attrs, targets)

        monkeypatch.setattr(room, "carry_in", carry_in)
    return hits


CASES = [(path, where, packed) for path in PATHS for where in ("after a compiled call", "inside publish", "carry_in")
         for packed in (True, False)
         if (where != "carry_in" or path.startswith("a list"))  # (the only paths that call carry_in every step)
         and (not packed or path in ("one call per step, a metric", "back to back"))]  # (the others never pack)


@pytest.mark.parametrize("path, where, packed", CASES, ids=[f"{p}, {w}{', packed' if k else ''}" for p, w, k in CASES])
def test_a_ctrl_c_while_jax_trains_leaves_whole_books(monkeypatch, path, where, packed):
    import lamina.training.jax_packing as packing

    kw = PATHS[path]
    if not packed:
        monkeypatch.setattr(packing, "PACK_BELOW_BYTES", -1)
    lm.set_backend("jax")
    x, y = _xy()
    net, opt = _net()
    batches = [(x[i:i + B], y[i:i + B]) for i in range(0, N, B)]
    if kw == "loop":
        grad = lm.value_and_grad(lambda m, xb, yb: lm.losses.mse(m(xb), yb))
        opt.step(grad(net, *batches[0])[1])
        hits = _signal_at(monkeypatch, where, 3)
        with pytest.raises(KeyboardInterrupt):
            for xb, yb in batches[1:]:
                opt.step(grad(net, xb, yb)[1])
        seen = batches
    else:
        kw = dict(kw)
        if kw.pop("batches", False):
            data, seen = batches, batches * 2
        else:
            order = np.random.default_rng(0).permutation(N)  # each fit's first epoch, seed 0
            data, seen = (x, y), [(x[order[i:i + B]], y[order[i:i + B]]) for i in range(0, N, B)] * 2
        kw.update(batch_size=B, progress=False)
        lm.fit(net, lm.losses.mse, opt, data, **kw)
        hits = _signal_at(monkeypatch, where, 3 if where == "after a compiled call" else 2)
        try:
            lm.fit(net, lm.losses.mse, opt, data, **kw)
        except KeyboardInterrupt:
            pass
    monkeypatch.undo()
    assert hits[0] >= (3 if where == "after a compiled call" else 2)  # the signal was sent
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # fit put Python's handler back
    done = opt.steps
    got = {k: to_np(v) for k, v in net.state_dict().items()}  # nothing deleted
    assert int(np.asarray(opt.state_dict()["0.weight/step"])) == done
    ref, ref_opt = _net()
    ref_grad = lm.value_and_grad(lambda m, xb, yb: lm.losses.mse(m(xb), yb))
    for xb, yb in seen[:done]:
        ref_opt.step(ref_grad(ref, xb, yb)[1])
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(got[k], to_np(v), rtol=1e-5, atol=1e-6, err_msg=k)
    lm.fit(net, lm.losses.mse, opt, (x, y), batch_size=B, progress=False)
    assert opt.steps == done + N // B


def test_a_second_ctrl_c_raises_at_once_and_callbacks_stay_interruptible(monkeypatch):
    """Inside fit a Ctrl-C waits for the step's books; a second one while it waits raises at once (the escape
    hatch, as for a long compilation), and a Ctrl-C inside a callback raises there, as in plain Python."""
    from lamina import context

    lm.set_backend("jax")
    x, y = _xy()
    net, opt = _net()
    where = []

    class Stop(lm.Callback):
        def on_batch_end(self, batch, logs):
            if batch == 2:
                where.append("callback")
                signal.raise_signal(signal.SIGINT)
                where.append("not reached")

    with pytest.raises(KeyboardInterrupt):
        lm.fit(net, lm.losses.mse, opt, (x, y), batch_size=B, progress=False, callbacks=[Stop()])
    assert where == ["callback"] and opt.steps == 3
    with context.interrupts_deferred():
        signal.raise_signal(signal.SIGINT)  # waits
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the second: at once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        with context.interrupts_deferred():
            signal.raise_signal(signal.SIGINT)  # waits, then raises as the region ends
            where.append("after")
    assert where[-1] == "after"
