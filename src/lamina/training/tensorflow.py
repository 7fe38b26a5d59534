"""Training on TensorFlow: the train step as one ``tf.function`` (forward, ``tf.GradientTape`` gradient and
the optimizer's own ``update`` rule together), and the eager engine for a user's own loop.

Parameters are ``tf.Variable``s that the step updates in place with ``assign`` (as torch's optimizers
write into the parameters' tensors), so nothing a user holds goes stale. Buffers (BatchNorm's running
statistics) are plain tensors: they go into the step as arguments and their new values come back, as
on jax. The optimizer's slots are ``tf.Variable``s owned by the engine.

Nothing but the batch crosses from the host per step. The per-step scalars (learning rate, bias
corrections: ``optimizer.scalars``) are rows of a ``tf.Variable`` that the host fills ahead of time and the
step reads at a position it advances itself (``_Scalars``); the dropout seed is a variable too, written only
for a model that draws random numbers (the first trace tells). Neither a schedule nor a new seed retraces
the step: it is traced once per input signature. A model without buffers gets no buffers argument
(tf.function binds each argument on each call). ``fit`` over arrays puts the epoch's rows on the device
once, in the epoch's order, stacked by batch, and each step takes its batch there (``epoch``); where a step
is fast it runs ``GROUP`` steps per call in a ``tf.while_loop`` (see ``GROUP_BELOW_S``), as the jax room
groups them in a ``lax.scan``. Every step's loss still reaches the callbacks. bench/tf_train_step.py, 2
shared cores: a 64-8-1 model, batch 32, ~0.03 ms a step in fit against ~0.2-0.3 ms for one call per step
(ours or a hand-written tf.function); the 784-512-512-10 MLP ~1.1x the hand-written XLA step.

The default compiles the step with XLA (``jit_compile=True``), measured faster on CPU (bench/tf_train_step.py,
2 shared cores, medians of 5 interleaved rounds): a 784-512-512-10 MLP with Adam, batch 128, 3.8 ms a step
with XLA against 5.9 ms in plain graph mode; a 64-8-1 model, batch 32, the same either way (0.41 ms). A model
with an op that XLA cannot compile falls back to graph mode on its first step. ``compile=True`` insists on
XLA, ``compile=False`` runs eagerly (one step per call, batches cut on the host).
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from .. import context, random
from ..backends import get_backend
from ..functional import _python_values
from .base import Grouping, carry_in, carry_out, pack_state

__all__ = ["make_step", "engine"]

# fit groups GROUP steps into one call where a step takes less than GROUP_BELOW_S: there tf.function's own
# cost per call (~0.1-0.2 ms of argument binding and dispatch) is a large share of the step. Up to TRY_BELOW_S
# it times a grouped call against single ones and keeps the faster (grouping paid 1.2-1.6x on the
# 784-512-512-10 MLP, ~2 ms a step; XLA runs convolutions ~4x slower inside a loop: the CNN of
# bench/train_step.py, ~35 ms a step, is not tried).
GROUP_BELOW_S = 1e-3
TRY_BELOW_S = 20e-3
GROUP = 16
# fit copies an epoch's arrays to the device once (in the epoch's order, stacked by batch), and takes each
# batch inside the compiled step, when they take at most this many bytes (else it cuts batches on the host
# and sends them one by one)
EPOCH_ON_DEVICE_BYTES = 1 << 30
_XLA_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, tf.errors.NotFoundError)


def make_step(model, loss_fn, optimizer, compile, outputs=True):
    """``step(x, y, lr) -> (loss, out)``, with ``step.many``, ``step.epoch`` and ``step.group``; see
    ``training/base.py``."""
    from ..functional import _swapped

    backend = get_backend(model.backend)
    targets: dict = {}  # attributes forward assigns (see base.carry_out), found while tracing
    eng = optimizer.engine(backend)
    scalars = _Scalars(optimizer, eng)
    seed = tf.Variable(tf.zeros(2, tf.int64), trainable=False)  # the dropout seed of the next call
    batch = tf.Variable(tf.constant(0, tf.int64), trainable=False)  # the next batch of the epoch on the device
    lay: dict = {"v": None, "vars": None, "gen": None, "bufs": None}
    # keys: None until traced, then whether a layer draws keys; stale: user code ran since the last layout
    flags = {"keys": None, "xla_failed": False, "stale": True}
    timing = Grouping(GROUP, GROUP_BELOW_S, TRY_BELOW_S)

    def layout():
        """The buffers; the compiled functions are made again when the parameters' variables or the
        optimizer's slot variables changed (model.to(), a new layer, a loaded optimizer state)."""
        version = (context.structure_version(), eng.generation)
        if lay["v"] != version:
            entries = optimizer.entries()
            eng.ensure(entries)
            variables = tuple(p.value for _, p in entries)
            bufs = list(model.named_buffers())
            modules = list(model.modules())
            if lay["vars"] is None or eng.generation != lay["gen"] or bool(bufs) != bool(lay["bufs"]) or len(
                    variables) != len(lay["vars"]) or any(a is not b for a, b in zip(variables, lay["vars"])):
                lay["fns"] = None
            lay.update(v=(context.structure_version(), eng.generation), gen=eng.generation, vars=variables,
                       bufs=bufs, entries=entries, modules=modules)
        # what a trace read besides the variables: the modules, their modes, their plain attributes
        # (``self.scale = 3.0``); a change makes the programs again, as jax's step traces again. Looked at
        # only after the structure changed or user code ran (``forget``)
        if lay["fns"] is None or flags["stale"]:
            modules = lay["modules"]
            key = (tuple(map(type, modules)), tuple(m.training for m in modules),
                   _python_values([m.__dict__ for m in modules]))
            if lay["fns"] is None or key != lay.get("key"):
                lay["fns"] = _programs(lay["vars"], [eng.slots_of(k, p) for k, p in lay["entries"]],
                                       bool(lay["bufs"]))
                flags["keys"] = None  # a new model may draw random numbers where the old one did not
                lay["key"] = key
            flags["stale"] = False
        return lay["bufs"]

    def _programs(variables, slots, has_bufs):
        def one(xb, yb, buffers, key):
            """One step, traced: forward, gradient, the update of every variable in place."""
            row = scalars.next_row()
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(variables)
                with random.key_scope(key) as scope:  # several inputs: a tuple/list positional, a dict keyword
                    t = type(xb)
                    args, kwargs = (tuple(xb), {}) if t in (tuple, list) else ((), xb) if t is dict else ((xb,), {})
                    model.ensure_built(*args, **kwargs)
                    carried: list = []
                    with _swapped(model, buffers, carried) as writes:
                        out = model(*args, **kwargs)
                    writes = dict(writes)
                if scope[1]:
                    flags["keys"] = True
                loss = loss_fn(out, yb)
            grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            eng.apply(variables, grads, slots, row)
            return loss, out, {k: writes.get(k, v) for k, v in buffers.items()}, carry_out(carried, targets)

        def steps(k, batch_at, buffers):
            """``k`` steps (k >= 2) as one ``tf.while_loop``; ``batch_at(j)`` -> step j's (x, y). Returns the
            losses, the buffers and the attributes of the last step."""
            key = tf.convert_to_tensor(seed)
            loss, _, buffers, attrs = one(*batch_at(0), buffers, key)
            losses = tf.TensorArray(loss.dtype, size=k, element_shape=loss.shape).write(0, loss)

            def body(j, buffers, attrs, losses):
                loss, _, buffers, attrs = one(*batch_at(j), buffers, tf.random.experimental.stateless_fold_in(key, j))
                return j + 1, buffers, attrs, losses.write(j, loss)

            _, buffers, attrs, losses = tf.while_loop(lambda j, *_: j < k, body, (tf.constant(1), buffers, attrs,
                                                                                 losses))
            return losses.stack(), buffers, attrs

        def single(x, y, buffers):
            loss, out, buffers, attrs = one(x, y, buffers, seed)  # the variable: read only if a layer draws
            return loss, (out if outputs else None), buffers, attrs

        def many(xs, ys, buffers):
            """Steps on the batches stacked along the leading axis of xs and ys."""
            return steps(int(ys.shape[0]), lambda j: (tf.gather(xs, j), tf.gather(ys, j)), buffers)

        def indexed(data, k, buffers):
            """Steps on the epoch's full batches ``data`` = (x, y), stacked along a leading batch axis (on the
            device, in the epoch's order), the ``batch`` variable's batch first. ``k=0``: one step, with its
            outputs and targets; ``k > 0``: ``k`` steps as one loop, returning their losses."""
            first = tf.convert_to_tensor(batch)

            def batch_at(j):  # XLA makes the gather of one batch a dynamic slice (and would compile a tf.slice
                # at a variable's offset anew for each value)
                return tf.nest.map_structure(lambda a: tf.gather(a, first + tf.cast(j, tf.int64)), data)

            if k == 0:
                xb, yb = batch_at(0)
                loss, out, buffers, attrs = one(xb, yb, buffers, seed)
                batch.assign_add(1)
                return loss, (out if outputs else None), (yb if outputs else None), buffers, attrs
            losses, buffers, attrs = steps(k, batch_at, buffers)
            batch.assign_add(k)
            return losses, None, None, buffers, attrs

        if not has_bufs:  # no buffers argument: tf.function binds every argument per call (~25 us for a dict)
            return {"single": _compiled(lambda x, y: single(x, y, {})),
                    "many": _compiled(lambda xs, ys: many(xs, ys, {})),
                    "indexed": _compiled(lambda data, k: indexed(data, k, {}))}
        return {"single": _compiled(single), "many": _compiled(many), "indexed": _compiled(indexed)}

    def _compiled(fn):
        if compile is False:
            return fn
        xla = tf.function(fn, jit_compile=True, autograph=False)
        if compile:
            return xla
        graph = tf.function(fn, autograph=False)

        def run(*args):
            """XLA by default; a model with an op XLA cannot compile falls back to graph mode, once."""
            if flags["xla_failed"]:
                return graph(*args)
            try:
                return xla(*args)
            except _XLA_ERRORS:
                flags["xla_failed"] = True
                return graph(*args)

        run.experimental_get_tracing_count = lambda: (graph if flags["xla_failed"] else xla
                                                      ).experimental_get_tracing_count()
        return run

    def call(name, lrs, *args, ahead=None):
        """The compiled function ``name`` for the steps of learning rates ``lrs`` (with the scalars and the
        seed in place); publishes the buffers and the attributes forward assigned."""
        bufs = layout()
        scalars.ready(lrs, ahead)
        if flags["keys"] is not False:
            seed.assign((random.next_seed(), 0))
        buffers = {k: p.value for k, p in bufs}
        try:
            result = lay["fns"][name](*args, buffers) if bufs else lay["fns"][name](*args)
        except BaseException:
            scalars.resync()
            raise
        if flags["keys"] is None:
            flags["keys"] = False  # traced (first call) and no layer drew a key: no randomness
        n = len(lrs)
        eng.count += n
        scalars.read += n
        new_bufs, attrs = result[-2], result[-1]
        carry_in(attrs, targets)
        for k, p in bufs:
            if new_bufs[k] is not buffers[k]:
                p.set_value(new_bufs[k], trusted=True)
        return result

    def step(x, y, lr):
        loss, out, _, _ = call("single", (lr,), x, y)
        return loss, out

    def step_many(xs, ys, lrs):
        """len(lrs) steps on the stacked batches xs, ys (leading axis: the step); returns the losses."""
        lrs = list(lrs)
        if len(lrs) > _Scalars.ROWS:  # more steps than the scalars' ring holds: in parts
            return tf.concat([step_many(xs[i:i + _Scalars.ROWS], ys[i:i + _Scalars.ROWS], lrs[i:i + _Scalars.ROWS])
                              for i in range(0, len(lrs), _Scalars.ROWS)], 0)
        return call("many", lrs, xs, ys)[0]

    def epoch(x, y, order, batch_size, k, lr_at, start, sync, each=True):
        """The steps of one epoch over the arrays ``x`` (an array, or a tuple or dict of arrays) and ``y``,
        as ``fit`` asks for them (``order``: the host permutation of the rows, or None), with the rows on the
        device once, in the epoch's order, stacked by batch, each step taking its batch there: yields ``(loss,
        out, rows per batch, steps, targets)`` like ``fit``'s loop. Parameters are variables updated in
        place, so the model shows every step's values (``sync`` asks for nothing more). ``each=False``:
        nothing reads the model or the figures between steps, so the full batches run back to back and an
        item's ``loss`` is the list of their losses, yielded about every 0.1 s (for the bar). Returns None
        (fit then cuts batches itself) for an eager step or data too large to copy to the device."""
        leaves = tf.nest.flatten((x, y))
        if compile is False or sum(getattr(a, "nbytes", 0) for a in leaves) > EPOCH_ON_DEVICE_BYTES:
            return None
        return _epoch(x, y, order, batch_size, k, lr_at, start, each)

    def _epoch(x, y, order, batch_size, k, lr_at, start, each):
        n = int(y.shape[0])
        if n == 0:
            return
        n_full, rem = divmod(n, batch_size)
        sizes = [batch_size] * n_full + ([rem] if rem else [])
        data = tf.nest.map_structure(on_device, (x, y))
        if order is not None:  # the rows in the epoch's order, once: TensorFlow's gather copies 12 MB in ~1.5 ms,
            # about a third of what XLA's gather of each batch's rows inside the steps costs
            rows = tf.constant(order.astype(np.int64))
            data = tf.nest.map_structure(lambda a: tf.gather(a, rows), data)
        stacked = tf.nest.map_structure(lambda a: tf.reshape(a[:n_full * batch_size], (n_full, batch_size,
                                                                                     *a.shape[1:])), data)
        tail = tf.nest.map_structure(lambda a: a[n_full * batch_size:], data)
        batch.assign(0)

        def run(j, kk):
            """Batch ``j`` (``kk=0``), or ``kk`` batches from ``j`` on as one loop: ``(loss(es), out, targets)``.
            The learning rates are asked of ``lr_at`` each time (a batch callback may change them)."""
            lrs = [lr_at(start + s) for s in range(j, j + max(kk, 1))]
            ahead = None if scalars.holds(lrs) else [lr_at(start + s) for s in
                                                     range(j, min(j + _Scalars.ROWS, len(sizes)))]
            if j == n_full:  # the last, smaller batch
                loss, out, _, _ = call("single", lrs, *tail, ahead=ahead)
                return loss, out, (tail[1] if outputs else None)
            return call("indexed", lrs, stacked, kk, ahead=ahead)[:3]

        j = 0
        while j < len(sizes):
            size = sizes[j]
            if k is None and timing.k is None:  # the first steps are timed, to choose the grouping
                t0 = time.perf_counter()
                loss, out, yb = run(j, 0)
                measure(loss, t0)
                j += 1
                yield loss, out, size, 1, yb
                continue
            if k is None and timing.trial and j + 2 * GROUP <= n_full:  # between the bounds: try grouping
                losses = run(j, GROUP)[0]  # traced and compiled: not timed
                losses.numpy()  # done before the timed call starts
                j += GROUP
                yield losses, None, size, GROUP, None
                t0 = time.perf_counter()
                losses = run(j, GROUP)[0]
                losses.numpy()
                timing.grouped(time.perf_counter() - t0)
                j += GROUP
                yield losses, None, size, GROUP, None
                continue
            kk = min(timing.k if k is None else k, _Scalars.ROWS)  # at most what the scalars' ring holds
            if not each and j < n_full:  # back to back, nothing to check between calls
                losses, j0, until = [], j, time.perf_counter() + 0.1
                finished = False
                try:
                    while j < n_full and (j == j0 or time.perf_counter() < until):
                        kk_ = kk if kk > 1 and j + kk <= n_full else 0
                        losses.append(run(j, kk_)[0])
                        j += max(kk_, 1)
                    finished = True
                finally:
                    if not finished:  # interrupted: these steps are never yielded, so fit cannot count them
                        optimizer.steps += j - j0
                yield losses, None, batch_size, j - j0, None
                continue
            if kk > 1 and j + kk <= n_full:
                losses = run(j, kk)[0]
                j += kk
                yield losses, None, size, kk, None
                continue
            loss, out, yb = run(j, 0)
            j += 1
            yield loss, out, size, 1, yb

    def measure(loss, t0):
        """Time one of the first steps, to choose the grouping (``base.Grouping``)."""
        loss.numpy()  # waits for the device (a GPU runs asynchronously)
        timing.single(time.perf_counter() - t0)

    def on_device(a):
        """An epoch array on the model's device, converted as a batch would be (float64 as float32)."""
        if type(a) is np.ndarray and a.dtype.kind in "biuf":
            return backend.from_numpy(a.astype(np.float32) if a.dtype == np.float64 else a, model.device)
        return model.convert_inputs(a)[0]

    def timed(x, y, lr):
        """``step``, timed on its first calls (see ``measure``) when the model is compiled."""
        if timing.k is not None or compile is False:
            return step(x, y, lr)
        t0 = time.perf_counter()
        loss, out = step(x, y, lr)
        measure(loss, t0)
        return loss, out

    timed.compiled = lambda: lay.get("fns", {}).get("single")  # tests count the traces through it
    timed.many = None if compile is False else step_many
    timed.group = lambda x: timing.k or 1
    timed.forget = lambda: flags.update(stale=True)  # fit calls it where user code ran
    timed.epoch = epoch
    return timed


class _Scalars:
    """The optimizer's per-step scalars (``optimizer.scalars``: learning rate, bias corrections) for the
    compiled step, as a ring of ``ROWS`` rows in a ``tf.Variable`` that the step reads at a position it
    advances itself. The host writes rows ahead: while the learning rate stays the same, ``ROWS`` updates at
    a time (one write per ``ROWS`` steps); when it changes (a schedule), the rows of the learning rates it
    knows (fit's epoch: the schedule's, else the coming call's). Each row is checked against (learning rate,
    update number) before use, so an update made elsewhere (the eager engine, a loaded state) is no error."""

    ROWS = 256

    def __init__(self, optimizer, eng):
        self.optimizer, self.eng = optimizer, eng
        self.host = np.zeros((self.ROWS, len(optimizer.scalars(optimizer.lr, 1))), np.float32)
        self.keys: list = [None] * self.ROWS  # (learning rate, update number) of each row
        self.values = tf.Variable(self.host, trainable=False)
        self.position = tf.Variable(tf.constant(0, tf.int64), trainable=False)
        self.read = 0  # the position variable's value: rows the compiled step has read

    def next_row(self):
        """This step's scalars, in the traced step; advances the position."""
        row = tf.gather(self.values, tf.math.floormod(tf.convert_to_tensor(self.position), self.ROWS))
        self.position.assign_add(1)
        return row

    def holds(self, lrs) -> bool:
        """Whether the next ``len(lrs)`` rows hold the scalars of the next updates with learning rates ``lrs``."""
        count, read, keys, rows = self.eng.count + 1, self.read, self.keys, self.ROWS
        if len(lrs) == 1:
            return keys[read % rows] == (lrs[0], count)
        return all(keys[(read + i) % rows] == (lr, count + i) for i, lr in enumerate(lrs))

    def ready(self, lrs, ahead=None):
        """Make the next rows hold the scalars of the next ``len(lrs)`` updates (at most ``ROWS``), with
        learning rates ``lrs``; ``ahead``: the learning rates of the updates from the next on, where known."""
        if self.holds(lrs):
            return
        if ahead is None:
            prev = self.keys[(self.read - 1) % self.ROWS]
            steady = prev is not None and all(lr == prev[0] for lr in lrs)  # the learning rate did not change
            ahead = list(lrs) + [lrs[-1]] * (self.ROWS - len(lrs)) if steady else lrs
        count, ahead = self.eng.count + 1, list(ahead[:self.ROWS])
        table = self.optimizer.scalar_table(ahead, count)
        for i, lr in enumerate(ahead):
            r = (self.read + i) % self.ROWS
            self.host[r] = table[i]
            self.keys[r] = (lr, count + i)
        self.values.assign(self.host)

    def resync(self):
        """After a failed call: the position as the device has it."""
        self.read = int(self.position.numpy())


def engine(optimizer, backend):
    """The eager engine of ``optimizer`` on tensorflow (see ``training/base.py``)."""
    return _Engine(optimizer, backend)


class _Engine:
    """``optimizer.update`` over ``tf.Variable`` slots; also the update inside the compiled step.
    ``generation`` counts the times a slot variable was made anew: a compiled step that captured the old
    ones is made again."""

    def __init__(self, optimizer, backend):
        self.backend = backend
        self.optimizer = optimizer
        self.state: dict = {}  # path -> {slot: tf.Variable}
        self.count = 0
        self.generation = 0
        self._eager = None

    def slots_of(self, k, p) -> dict:
        st = self.state.get(k)
        v = p.value
        if st is None or any(s.shape != v.shape or s.dtype != v.dtype for s in st.values()):
            st = self.state[k] = {s: tf.Variable(tf.zeros_like(v), trainable=False) for s in self.optimizer.slots}
            self.generation += 1
            self._eager = None
        return st

    def ensure(self, entries):
        for k, p in entries:
            self.slots_of(k, p)

    def apply(self, variables, grads, slots, scalars):
        """One update of every variable (in place), traceable: used eagerly and inside tf.function."""
        xp = self.backend.xp
        for var, g, st in zip(variables, grads, slots):
            new, new_state = self.optimizer.update(tf.convert_to_tensor(var), tf.convert_to_tensor(g),
                                                   {s: tf.convert_to_tensor(v) for s, v in st.items()}, scalars, xp)
            var.assign(tf.cast(new, var.dtype))
            for s, value in new_state.items():
                st[s].assign(value)

    def step(self, entries, grads, lr):
        variables, gs, slots = [], [], []
        for k, p in entries:
            g = p.grad if grads is None else grads[k]
            variables.append(p.value)
            gs.append(g)
            slots.append(self.slots_of(k, p))
        if self._eager is None:
            self._eager = tf.function(self.apply, autograph=False)  # retraced only when the variables change
        self._eager(variables, gs, slots, tf.constant(self.optimizer.scalars(lr, self.count + 1)))
        self.count += 1

    def state_dict(self, entries):
        slots = self.optimizer.slots
        return pack_state({k: {s: tf.identity(self.slots_of(k, p)[s]) for s in slots} for k, p in entries}, slots,
                          tf.constant(float(self.count), tf.float32))

    def load_state_dict(self, entries, arrays):
        """Write the loaded values into the slot variables (a compiled step holds them), made first: all or
        nothing; an empty mapping resets the moments to zeros and the count to 0."""
        new = {}
        for k, p in entries:
            dtype = p.value.dtype
            new[k] = {s: (tf.constant(np.asarray(arrays[f"{k}/{s}"]), dtype) if arrays else tf.zeros_like(p.value))
                      for s in self.optimizer.slots}
        for k, p in entries:
            st = self.slots_of(k, p)
            for s, value in new[k].items():
                st[s].assign(value)
        self.count = int(np.asarray(arrays[f"{entries[0][0]}/step"]).reshape(-1)[0]) if arrays and entries else 0
