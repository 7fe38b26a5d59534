"""Training on jax: one ``jax.jit`` program per input shape (forward, gradient and the optimizer's own
``update`` rule together), and the eager engine for a user's own loop.

Buffers are donated to XLA so that it updates parameters and optimizer state in place (measured on CPU:
1.36x the steps per second of the same program without donation on a 784-512-512-10 MLP), but only
arrays that the step itself produced and nobody else was given: any other value (a parameter the user
assigned, a mapping given to ``load_state_dict``, arrays present before ``fit`` began, which a
``state_dict()`` snapshot may hold) is copied once before its first donation (DESIGN.md, rule 8).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from .. import context, random
from .base import state_keys

__all__ = ["make_step", "engine"]

# fit groups steps into one compiled call (lax.scan) only where a step is this fast: there the Python
# around each call is a real share of the time; on larger models (convolutions above all, which XLA's CPU
# backend runs several times slower inside a loop body) one step per call is as fast or faster.
GROUP_BELOW_S = 1e-3
GROUP = 16


def make_step(model, loss_fn, optimizer, compile, outputs=True):
    """``step(x, y, lr) -> (loss, out)`` as one ``jax.jit`` program; see ``training/base.py``."""
    from ..functional import _swapped

    eng = optimizer.engine(model._backend)
    opt = optimizer

    def pure(params, bufs, consts, state, x, y, scalars, seed):
        def f(ps):
            swap = {**consts, **bufs, **{paths[k]: v for k, v in ps.items()}}
            with _swapped(model, swap) as writes, random.key_scope(jax.random.key(seed)) as scope:
                out = model(x)
            if scope[1]:  # seen while tracing: this model draws random numbers, it needs a new seed per step
                uses_keys[0] = True
            return loss_fn(out, y), (out, dict(writes))

        (loss, (out, writes)), grads = jax.value_and_grad(f, has_aux=True)(params)
        params, state = eng.update_all(grads, state, params, scalars)
        return params, {**bufs, **writes}, state, loss, (out if outputs else None)

    def many(params, bufs, consts, state, xs, ys, table, seeds):
        """Steps over the leading axis of xs, ys, table and seeds, as one program: the same update per step."""
        def body(carry, batch):
            p, b, s, loss, _ = pure(carry[0], carry[1], consts, carry[2], *batch)
            return (p, b, s), loss

        (params, bufs, state), losses = jax.lax.scan(body, (params, bufs, state), (xs, ys, table, seeds))
        return params, bufs, state, losses

    run = pure if compile is False else jax.jit(pure, donate_argnums=(0, 1, 3))
    run_many = None if compile is False else jax.jit(many, donate_argnums=(0, 1, 3))
    paths: dict = {}  # optimizer name -> path in this model
    lay: dict = {"v": None}
    owned: dict = {}  # id -> array, for arrays this step produced and nobody else holds: safe to donate
    uses_keys = [None]  # None until the first trace tells whether any layer draws random numbers
    fixed = {None: jnp.zeros((), jnp.uint32)}  # for models without randomness: no host draw, no transfer
    timing = {"k": None, "times": []}

    def seeds(n=None):
        if uses_keys[0] is False:
            if n not in fixed:
                fixed[n] = jnp.zeros((n,), jnp.uint32)
            return fixed[n]
        return np.uint32(random.next_seed()) if n is None else random.next_seeds(n)

    def layout():
        """Names, parameters, buffers and constants, recomputed only when the model's structure changed
        (a trainable flag flipping counts as a change)."""
        version = context.structure_version()
        if lay["v"] != version:
            entries = opt.entries()
            trainable = {id(p) for _, p in entries}
            all_entries = list(model.named_parameters()) + list(model.named_buffers())
            where = {id(p): path for path, p in all_entries}
            paths.clear()
            paths.update({k: where.get(id(p), k) for k, p in entries})
            rest = [(path, p) for path, p in all_entries if id(p) not in trainable]
            lay.update(v=version, entries=entries, bufs=[(k, p) for k, p in rest if p._is_buffer],
                       consts=[(k, p) for k, p in rest if not p._is_buffer])
            eng.ensure(entries)
        return lay["entries"], lay["bufs"], lay["consts"]

    def donatable(pairs):
        """``{name: value}`` whose arrays may be donated: values the step did not produce are copied."""
        out = {}
        for k, p in pairs:
            v = p.value
            if owned.get(id(v)) is not v:
                v = jnp.array(v, copy=True)
            out[k] = v
        return out

    def own_state():
        state = eng.state
        if any(owned.get(id(a)) is not a for st in state.values() for a in st.values()):
            state = {k: {s: a if owned.get(id(a)) is a else jnp.array(a, copy=True) for s, a in st.items()}
                     for k, st in state.items()}
        return state

    def publish(entries, buf_entries, params, bufs, state):
        owned.clear()
        for k, p in entries:  # the new values replace the donated ones everywhere they are shown
            v = params[k]
            p.set_value(v, trusted=True)
            owned[id(v)] = v
        for k, p in buf_entries:
            v = bufs[k]
            p.set_value(v, trusted=True)
            owned[id(v)] = v
        for st in state.values():
            for a in st.values():
                owned[id(a)] = a
        eng.state = state

    def arguments():
        entries, buf_entries, const_entries = layout()
        return (entries, buf_entries, donatable(entries), donatable(buf_entries),
                {k: p.value for k, p in const_entries}, own_state())

    def step(x, y, lr):
        entries, buf_entries, params, bufs, consts, state = arguments()
        params, bufs, state, loss, out = run(params, bufs, consts, state, x, y,
                                             opt.scalars(lr, eng.count + 1), seeds())
        if uses_keys[0] is None:
            uses_keys[0] = False  # traced (first call) and no layer set it: no randomness
        eng.count += 1
        publish(entries, buf_entries, params, bufs, state)
        return loss, out

    def step_many(xs, ys, lrs):
        """len(lrs) steps on the stacked batches xs, ys (leading axis: the step); returns the losses."""
        entries, buf_entries, params, bufs, consts, state = arguments()
        table = np.stack([opt.scalars(lr, eng.count + 1 + i) for i, lr in enumerate(lrs)])
        params, bufs, state, losses = run_many(params, bufs, consts, state, xs, ys, table, seeds(len(lrs)))
        if uses_keys[0] is None:
            uses_keys[0] = False
        eng.count += len(lrs)
        publish(entries, buf_entries, params, bufs, state)
        return losses

    def forget():
        """Treat every current value as held by someone else (``fit`` calls it where user code ran)."""
        owned.clear()

    def timed(x, y, lr):
        """``step``, timed (with a wait for the result) on a few calls after the first, so that ``group``
        can tell whether grouping steps pays for this model."""
        if timing["k"] is not None or compile is False:
            return step(x, y, lr)
        t0 = time.perf_counter()
        loss, out = step(x, y, lr)
        jax.block_until_ready(loss)
        times = timing["times"]
        times.append(time.perf_counter() - t0)
        if len(times) >= 4:  # the first includes the compilation
            timing["k"] = GROUP if sorted(times[1:])[1] < GROUP_BELOW_S else 1
        return loss, out

    def group(x) -> int:
        """How many steps fit should run per call: 1 until measured, then 16 for fast steps, else 1."""
        return timing["k"] or 1

    def convert(a):
        """A batch for the step: NumPy arrays are given to the compiled call as they are (it moves them to
        the device itself, ~10x cheaper than ``jax.device_put`` first), floating ones as float32."""
        if type(a) is np.ndarray and a.dtype.kind in "biuf":
            return a.astype(np.float32) if a.dtype == np.float64 else a
        return model._convert_inputs((a,))[0]

    timed.compiled = run  # exposed so tests can count compilations
    timed.convert = convert if compile is not False else None
    timed.many = None if run_many is None else step_many
    timed.group = group
    timed.forget = forget
    return timed


def engine(optimizer, backend):
    """The eager engine of ``optimizer`` on jax (see ``training/base.py``)."""
    return _Engine(optimizer, backend)


class _Engine:
    """``lm.optim`` on jax: the optimizer's ``update`` over ``{path: array}`` dicts, jitted; the state is
    ``{path: {slot: array}}`` with torch's slot names, so a state saved on one backend loads on the other."""

    def __init__(self, optimizer, backend):
        self.backend, self.optimizer = backend, optimizer
        self.state: dict = {}
        self.names: list = []
        self.count = 0  # updates done, mirrored on the host to build the scalars without a device sync
        self._eager = jax.jit(self.update_all)

    def update_all(self, grads, state, params, scalars):
        new_params, new_state = {}, {}
        update = self.optimizer.update
        for k, p in params.items():
            new_params[k], new_state[k] = update(p, grads[k], state[k], scalars, jnp)
        return new_params, new_state

    def ensure(self, entries):
        names = [k for k, _ in entries]
        if names != self.names:
            slots = self.optimizer.slots
            old = self.state
            self.state = {k: old[k] if k in old else {s: jnp.zeros_like(p.value) for s in slots} for k, p in entries}
            if not self.names:
                self.count = 0
            self.names = names

    def step(self, entries, grads, lr):
        self.ensure(entries)
        params = {k: p.value for k, p in entries}
        new, self.state = self._eager({k: grads[k] for k in params}, self.state, params,
                                      self.optimizer.scalars(lr, self.count + 1))
        self.count += 1
        for k, p in entries:
            p.set_value(new[k], trusted=True)

    def state_dict(self, entries):
        self.ensure(entries)
        out = {}
        for k in self.names:
            for slot, a in self.state[k].items():
                out[f"{k}/{slot}"] = jnp.array(a, copy=True)  # a copy: the step may donate the original
            out[f"{k}/step"] = jnp.float32(self.count)
        return {key: out[key] for key in state_keys(self.names, self.optimizer.slots)}

    def load_state_dict(self, entries, arrays):
        self.ensure(entries)
        if not arrays:
            self.state = {k: {s: jnp.zeros_like(p.value) for s in self.optimizer.slots} for k, p in entries}
            self.count = 0
            return
        self.state = {k: {s: jnp.array(np.array(arrays[f"{k}/{s}"]), dtype=p.value.dtype)
                          for s in self.optimizer.slots} for k, p in entries}
        self.count = int(np.asarray(arrays[f"{self.names[0]}/step"]).reshape(-1)[0]) if self.names else 0
