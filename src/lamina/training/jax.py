"""Training on jax: one ``jax.jit`` program per input shape (forward, gradient and the optimizer's own
``update`` rule together), and the eager engine for a user's own loop.

Buffers are donated to XLA so that it updates parameters and optimizer state in place (measured on CPU:
1.36x the steps per second of the same program without donation on a 784-512-512-10 MLP), but only
arrays that nobody else holds: those the step produced and has not given out since, and those that only
Lamina refers to (``_adopt_unshared``: the reference count, and no other live array on the buffer). Any
other value (a parameter the user assigned, a mapping given to ``load_state_dict``, arrays a
``state_dict()`` snapshot or a callback holds, an array ``jax.device_put`` from a weight) is copied before
its donation (DESIGN.md, rule 8).
"""

from __future__ import annotations

import time
from itertools import starmap

import jax
import jax.numpy as jnp
import numpy as np

from .. import context, random
from ..backends import get_backend
from ..functional import _python_values
from .base import Grouping, call, carry_in, carry_out, only_held_by, pack_state
from .jax_packing import Unpackable, copied, packing_for, true_on, unpackable

__all__ = ["make_step", "engine", "make_forward", "COMPILE_INFERENCE"]

# evaluate and predict run the forward compiled (make_forward): eager jax dispatches op by op, which costs
# ~10x a compiled call on op-heavy layers (a Transformer block: issue 9)
COMPILE_INFERENCE = True

# fit groups GROUP steps into one compiled call (lax.scan) where a step takes less than GROUP_BELOW_S (there
# the Python around each call is a real share of the time), never from TRY_BELOW_S on (convolutions, which
# XLA's CPU backend runs several times slower inside a loop body), and in between where a timed grouped call
# beats single steps (the 784-512-512-10 MLP: 1.03x the hand-written loop grouped, 0.93x one step per call)
GROUP_BELOW_S = 1e-3
TRY_BELOW_S = 20e-3
GROUP = 16
# fit copies an epoch's arrays to the device once, and gathers each batch inside the compiled step, when
# they take at most this many bytes (else it cuts batches on the host and sends them one by one)
EPOCH_ON_DEVICE_BYTES = 1 << 30
# and shuffles NumPy arrays into a host buffer kept for the next epoch when an array is at most this size
HOST_BUFFER_BYTES = 256 << 20
# values that only Lamina refers to are donated without the protective copy from this many bytes on (below,
# the copy, one compiled call, costs less than looking through the live arrays: see _adopt_unshared)
ADOPT_FROM_BYTES = 4 << 20


def make_step(model, loss_fn, optimizer, compile, outputs=True):
    """``step(x, y, lr) -> (loss, out)`` as one ``jax.jit`` program; see ``training/base.py``."""
    from ..functional import _swapped

    eng = optimizer.engine(get_backend(model.backend))
    opt = optimizer

    def pure(params, bufs, consts, state, x, y, scalars, seed, key=None):
        def f(ps):
            swap = {**consts, **bufs, **{paths[k]: v for k, v in ps.items()}}
            carried: list = []
            with random.key_scope(jax.random.key(seed)) as scope:
                with _swapped(model, swap, carried) as writes:
                    out = call(model, x)
                writes = dict(writes)
            if scope[1]:  # seen while tracing: this model draws random numbers, it needs a new seed per step
                uses_keys[0] = True
            return loss_fn(out, y), (out, writes, carry_out(carried, targets))

        (loss, (out, writes, attrs)), grads = jax.value_and_grad(f, has_aux=True)(params)
        attrs = jax.lax.stop_gradient(attrs)
        writes = {k: v.astype(bufs[k].dtype) if k in bufs else v for k, v in writes.items()}  # (as an eager write)
        params, state = eng.update_all(grads, state, params, scalars)
        return params, {**bufs, **writes}, state, loss, (out if outputs else None), attrs

    def many(params, bufs, consts, state, xs, ys, table, seeds, key=None):
        """Steps over the leading axis of xs, ys, table and seeds, as one program: the same update per step."""
        def body(carry, batch):
            p, b, s, loss, _, attrs = pure(carry[0], carry[1], consts, carry[2], *batch)
            return (p, b, s), (loss, attrs)

        (params, bufs, state), (losses, attrs) = jax.lax.scan(body, (params, bufs, state), (xs, ys, table, seeds))
        return params, bufs, state, losses, _last(attrs)

    def indexed(params, bufs, consts, state, data, table, seeds, i, losses, full, size, k, key=None):
        """Steps on batches sliced on the device from the epoch's arrays ``data`` = (x, y), already in the
        epoch's order: step ``i`` takes rows ``i * full : i * full + size``, with ``table[i]`` as its
        scalars and ``seeds[i]`` as its seed, and writes its loss to ``losses[i]`` (the epoch's losses, read
        back in one transfer rather than one per step: ~1 us a step). ``k=0``: one step, with its loss,
        outputs and targets; ``k=-1``: one step, its loss in ``losses`` only (each output array costs ~1 us
        of dispatch per call, 5% of a small model's step); ``k>0``: ``k`` steps as one scan, returning their losses.
        Returns the new ``i`` and ``losses`` too, so the host never sends a step index."""
        def one(carry, _):
            p, b, s, j = carry
            xb, yb = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, j * full, size), data)
            p, b, s, loss, out, attrs = pure(p, b, consts, s, xb, yb, table[j], seeds[j] if seeds.ndim else seeds)
            return (p, b, s, j + 1), (loss, out, yb, attrs)

        if k <= 0:
            (params, bufs, state, j), (loss, out, yb, attrs) = one((params, bufs, state, i), None)
            losses = jax.lax.dynamic_update_slice_in_dim(losses, loss[None].astype(losses.dtype), i, 0)
            if k < 0:
                return params, bufs, state, j, losses, None, None, None, attrs
            return params, bufs, state, j, losses, loss, out, (yb if outputs else None), attrs
        (params, bufs, state, j), (loss, _, _, attrs) = jax.lax.scan(one, (params, bufs, state, i), None, length=k)
        losses = jax.lax.dynamic_update_slice_in_dim(losses, loss.astype(losses.dtype), i, 0)
        return params, bufs, state, j, losses, loss, None, None, _last(attrs)

    # ``key`` (static: see ``trace_key``) makes jax trace again when what forward reads besides the arrays changed
    run = pure if compile is False else jax.jit(pure, donate_argnums=(0, 1, 3), static_argnums=(8,))
    run_many = None if compile is False else jax.jit(many, donate_argnums=(0, 1, 3), static_argnums=(8,))
    run_indexed = jax.jit(indexed, donate_argnums=(0, 1, 3, 8), static_argnums=(9, 10, 11, 12))
    packings: dict = {}  # (structure, shapes, dtypes) -> Packing (training/jax_packing.py)
    packed_runs: dict = {}  # Packing -> ``indexed`` on its vectors, compiled

    def packed_run(pk):
        """``run_indexed`` for a small model whose parameters, buffers and optimizer state travel as ``pk``'s
        vectors (passed in the parameters' place; None for the buffers and the state): only those vectors
        and the loss vector are donated."""
        if pk not in packed_runs:
            def run(vectors, _bufs, consts, _state, data, table, seeds, i, losses, full, size, k, key=None):
                params, bufs, state = pk.unpack(vectors)
                p, b, st, j, losses, loss, out, yb, attrs = indexed(params, bufs, consts, state, data, table, seeds, i,
                                                                    losses, full, size, k, key)
                return pk.pack((p, {n: b[n] for n in bufs}, st)), None, None, j, losses, loss, out, yb, attrs
            packed_runs[pk] = jax.jit(run, donate_argnums=(0, 8), static_argnums=(9, 10, 11, 12))
        return packed_runs[pk]
    paths: dict = {}  # optimizer name -> path in this model
    lay: dict = {"v": None}
    owned: dict = {}  # id -> array, for arrays this step produced and nobody else holds: safe to donate
    uses_keys = [None]  # None until the first trace tells whether any layer draws random numbers
    targets: dict = {}  # attributes forward assigns (see base.carry_out), found while tracing
    fixed = {None: jnp.zeros((), jnp.uint32)}  # made once: no transfer per call
    timing = Grouping(GROUP, GROUP_BELOW_S, TRY_BELOW_S)
    stale = [True]  # user code may have changed what forward reads since trace_key last looked
    # input slot -> [host buffer of the epoch's rows, the last epoch's final loss vector, (the model's device,
    # the device array on that very memory) on CPU, else None]
    host: dict = {}
    spare: dict = {}  # (length, device) -> the last epoch's loss vector, for the next epoch to write over

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
            modules = list(model.modules())
            lay.update(v=version, entries=entries, bufs=[(k, p) for k, p in rest if p.is_buffer],
                       consts=[(k, p) for k, p in rest if not p.is_buffer], modules=modules,
                       kinds=tuple(map(type, modules)))
            eng.ensure(entries)
        return lay["entries"], lay["bufs"], lay["consts"]

    def trace_key() -> tuple:
        """What a traced step read besides its arrays: the model's modules (a layer without parameters added
        or removed), their modes and their plain Python attributes (``self.scale = 3.0``), as the compiled
        forward of ``evaluate`` keys on them. Call after ``layout``. Worked out again only after the structure
        changed or user code ran (``forget``): ~3 us for 4 modules, ~30 us for 60."""
        if stale[0] or lay.get("keyed") != lay["v"]:
            modules = lay["modules"]
            lay.update(keyed=lay["v"], key=(lay["kinds"], tuple(m.training for m in modules),
                                            _python_values([m.__dict__ for m in modules])))
            stale[0] = False
        return lay["key"]

    def arguments(host=None, pack=False):
        """The step's arguments from the model: values that someone else may hold (the step did not produce
        them, or user code ran since, and more than Lamina refers to them) are copied, all in one compiled
        call, before they are donated. ``host``: a NumPy array to send to the parameters' device in that same
        call (the epoch's scalar table: a ``device_put`` of its own, the first transfer after the host's
        work on the epoch, waits ~0.1 ms for the device); returned on the device (else None). ``pack``: a
        small model's parameters, buffers and state come as the vectors of a ``Packing`` (returned last,
        else None) in the parameters' place, None in the others' (new buffers: nothing is copied)."""
        entries, buf_entries, const_entries = layout()
        if not owned:  # first call, or user code ran (forget): the state follows a model that moved
            eng.state = _on_devices_of(eng.state, entries)  # (model.to("cuda:1")), and what nobody but Lamina
            _adopt_unshared(entries, buf_entries, eng.state, owned)  # refers to is adopted
        params = {k: p.value for k, p in entries}
        bufs = {k: p.value for k, p in buf_entries}
        state = eng.state
        consts = {k: p.value for k, p in const_entries}
        pk = packing_for((params, bufs, state), packings) if pack else None
        if pk is not None:  # (committed, as the step's outputs are: one compilation of pack_call, not two)
            tree = jax.tree_util.tree_map(_committed, (params, bufs, state))
            device = next(iter(jax.tree_util.tree_leaves(tree)[0].devices()))  # (packing_for: one device, all)
            vectors, host = pk.pack_call(tree, true_on(device), host)
            return entries, buf_entries, vectors, None, consts, None, host, pk
        foreign = lambda a: owned.get(id(a)) is not a  # noqa: E731
        if host is not None or any(map(foreign, jax.tree_util.tree_leaves((params, bufs, state)))):
            (params, bufs, state), host = _copy_foreign((params, bufs, state), owned, host)
        return entries, buf_entries, params, bufs, consts, state, host, None

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

    def step(x, y, lr):
        entries, buf_entries, params, bufs, consts, state, _, _ = arguments()
        got: list = []
        try:
            params, bufs, state, loss, out, attrs = _kept(run, (params, bufs, consts, state, x, y, opt.scalars(
                lr, eng.count + 1), seeds(), trace_key()), got, 1)
        except BaseException:
            interrupted(got, entries, buf_entries)
            raise
        publish(entries, buf_entries, params, bufs, state)  # first: the call donated the old values
        eng.count += 1
        carry_in(attrs, targets)
        if uses_keys[0] is None:
            uses_keys[0] = False  # traced (first call) and no layer set it: no randomness
        return loss, out

    def interrupted(got, entries, buf_entries):
        """A call raised (a Ctrl-C as it returned: see ``_kept``): if it ran, publish and count its steps."""
        if len(got) == 2:  # [steps, result]: it returned
            publish(entries, buf_entries, *got[1][:3])
            eng.count += got[0]
            opt.steps += got[0]  # (fit counts a step once the call returns it)

    def step_many(xs, ys, lrs):
        """len(lrs) steps on the stacked batches xs, ys (leading axis: the step); returns the losses."""
        entries, buf_entries, params, bufs, consts, state, _, _ = arguments()
        table = opt.scalar_table(lrs, eng.count + 1)
        got: list = []
        try:
            params, bufs, state, losses, attrs = _kept(run_many, (params, bufs, consts, state, xs, ys, table, seeds(
                len(lrs)), trace_key()), got, len(lrs))
        except BaseException:
            interrupted(got, entries, buf_entries)
            raise
        publish(entries, buf_entries, params, bufs, state)  # first: the call donated the old values
        eng.count += len(lrs)
        carry_in(attrs, targets)
        if uses_keys[0] is None:
            uses_keys[0] = False
        return losses

    def epoch(x, y, order, batch_size, k, lr_at, start, sync, each=True):
        """The steps of one epoch over the arrays ``x`` (an array, or a tuple or dict of arrays) and ``y``,
        as ``fit`` asks for them (``order``: the host permutation of the rows, or None), with the data on
        the device once, in the epoch's order, and each batch sliced inside the compiled step: yields
        ``(loss, out, rows per batch, steps, targets)`` like ``fit``'s loop. The parameters stay on the
        device between steps and are published when the epoch ends (after every call with ``sync``, for
        batch callbacks). ``each=False``: nothing reads the model or the figures between steps (no batch
        callback, no metric), so the full batches run back to back and an item's ``loss`` is the list of
        their losses, yielded about every 0.1 s (for the bar). Returns None (fit then cuts batches itself)
        for an eager step or data too large to copy to the device."""
        leaves = jax.tree_util.tree_leaves((x, y))
        if compile is False or sum(getattr(a, "nbytes", 0) for a in leaves) > EPOCH_ON_DEVICE_BYTES:
            return None
        return _epoch(x, y, order, batch_size, k, lr_at, start, sync, each)

    def _epoch(x, y, order, batch_size, k, lr_at, start, sync, each):
        n = int(leaves_rows(x))
        if n == 0:
            return
        n_full, rem = divmod(n, batch_size)
        sizes = [batch_size] * n_full + ([rem] if rem else [])
        # the rows in the epoch's order, once: a gather inside each step costs ~7 us per step
        leaves, tree = jax.tree_util.tree_flatten((x, y))
        data = jax.tree_util.tree_unflatten(tree, [on_device(a, order, slot) for slot, a in enumerate(leaves)])
        count0 = eng.count
        lrs = [lr_at(start + s) for s in range(len(sizes))]
        table_np = opt.scalar_table(lrs, count0 + 1)
        # packed only for one step per call (inside a grouped call, unpacked steps are faster: training/jax_packing.py),
        # and not for a batch callback, which reads the model after each call (its values are published each time)
        single = k == 1 if k is not None else timing.k == 1 and not timing.trial
        entries, buf_entries, params, bufs, consts, state, table, pk = arguments(table_np, pack=single and not sync)
        run = run_indexed if pk is None else packed_run(pk)
        key = trace_key()
        got: list = []  # [steps, results] of the last call (see _kept)

        def unpack_for_good():
            """The step does not fit its packing (``Unpackable``, raised while tracing: nothing was donated):
            the rest of the epoch, and later ones, run unpacked, on the arrays of the vectors held now."""
            nonlocal pk, run
            held[:3] = pk.unpack_call(held[0])  # new arrays that only Lamina holds
            unpackable(pk, packings)
            pk, run = None, run_indexed

        device = next(iter(table.devices()))
        put = lambda a: _committed(jax.device_put(a, device))  # noqa: E731  (jnp.asarray: ~7x the time)
        # one seed per step, drawn once for the epoch (zeros, kept on the device, for a model that draws no
        # random numbers; not known before the first trace, so drawn then)
        seeds_ = put(random.next_seeds(len(sizes))) if uses_keys[0] is not False else seeds(len(sizes))
        if ("i0", device) not in fixed:  # never donated: one for every epoch
            fixed["i0", device] = put(np.zeros((), np.int32))
        # the loss vector: the last epoch's when it has the length (the steps overwrite it), else a new one
        losses0 = spare.pop((len(sizes), device), None)
        losses0 = put(np.zeros(len(sizes), np.float32)) if losses0 is None else losses0
        held = [params, bufs, state, fixed["i0", device], losses0]  # what the device holds, the model does not show

        def check_lrs(lo, hi):
            """A batch callback may have changed the learning rate: send the table again if it did."""
            nonlocal table
            changed = False
            for s in range(lo, hi):
                lr = lr_at(start + s)
                if lr != lrs[s]:
                    lrs[s] = lr
                    table_np[s] = opt.scalars(lr, count0 + 1 + s)
                    changed = True
            if changed:
                table = put(table_np)

        def fresh_seeds():
            """A step traced again drew random numbers for the first time (a Dropout added since): from now on
            each step gets its own seed, not the zeros of a model without randomness."""
            nonlocal seeds_
            if uses_keys[0] and seeds_ is fixed.get(len(sizes)):
                seeds_ = put(random.next_seeds(len(sizes)))

        def call(size, kk, at):
            """Step ``at`` (``kk`` <= 0) or the ``kk`` steps from it, in one call."""
            nonlocal consts, entries, buf_entries, key
            if sync:  # a batch callback ran since the last call: it may hold the published values (copied now,
                # never donated) or have changed the model or the optimizer state (read again)
                entries, buf_entries, held[0], held[1], consts, held[2], _, _ = arguments()
                key = trace_key()
            n = max(kk, 1)
            try:
                r = _kept(run, (held[0], held[1], consts, held[2], data, table, seeds_, held[3], held[4], batch_size,
                                size, kk, key), got, n)
            except Unpackable:
                unpack_for_good()
                r = _kept(run, (held[0], held[1], consts, held[2], data, table, seeds_, held[3], held[4], batch_size,
                                size, kk, key), got, n)
            held[:] = r[:5]  # first: the call donated the old ones (a Ctrl-C comes only at a call: none in
            eng.count += n   # between, and the epoch's finally takes a result that never reached here)
            p, b, st, i, lv, loss, out, yb, attrs = r
            fresh_seeds()
            if attrs:
                carry_in(attrs, targets)
            if uses_keys[0] is None:
                uses_keys[0] = False  # traced (first call) and no layer set it: no randomness
            if sync:
                publish(entries, buf_entries, p, b, st)
            if kk < 0:  # its loss from the vector (a copy, never a view: the next step donates the vector)
                loss = np.array(lv)[at]
            return loss, out, yb

        one = 0 if each else -1  # a single step: its outputs and targets only where they are read
        j = 0
        try:
            while j < len(sizes):
                size = sizes[j]
                if k is None and timing.k is None:  # the first steps are timed, to choose the grouping
                    check_lrs(j, j + 1)
                    t0 = time.perf_counter()
                    loss, out, yb = call(size, one, j)
                    jax.block_until_ready(loss)
                    timing.single(time.perf_counter() - t0)
                    j += 1
                    yield loss, out, size, 1, yb
                    continue
                if k is None and timing.trial and j + 2 * GROUP <= n_full:  # time a grouped call against them
                    for timed_call in (False, True):  # the first compiles
                        check_lrs(j, j + GROUP)
                        t0 = time.perf_counter()
                        losses = call(size, GROUP, j)[0]
                        jax.block_until_ready(losses)
                        if timed_call:
                            timing.grouped(time.perf_counter() - t0)
                        j += GROUP
                        yield losses, None, size, GROUP, None
                    continue
                kk = timing.k if k is None else k
                if not each and j < n_full:  # back to back, nothing to check between calls
                    j0, until = j, time.perf_counter() + 0.1
                    p, b, st, i, lv = held
                    attrs = None
                    got.clear()
                    try:
                        while j < n_full and (j == j0 or time.perf_counter() < until):
                            kk_ = kk if kk > 1 and j + kk <= n_full else -1
                            try:
                                p, b, st, i, lv, _, _, _, attrs = _kept(run, (p, b, consts, st, data, table, seeds_,
                                                                              i, lv, batch_size, batch_size, kk_, key),
                                                                        got, max(kk_, 1))
                            except Unpackable:
                                held[0] = p
                                unpack_for_good()
                                p, b, st = held[:3]
                                continue
                            j += got[0]
                            if uses_keys[0] and seeds_ is fixed.get(len(sizes)):
                                fresh_seeds()
                    finally:  # what the device holds now, even when a call failed
                        if len(got) == 2 and got[1][0] is not p:  # a Ctrl-C as the call returned (see _kept)
                            p, b, st, i, lv, _, _, _, attrs = got[1]
                            j += got[0]
                        got.clear()  # (counted)
                        held[:] = [p, b, st, i, lv]
                        eng.count += j - j0  # (never yielded when interrupted: the epoch's finally counts them)
                        if attrs:
                            carry_in(attrs, targets)
                        if uses_keys[0] is None and attrs is not None:
                            uses_keys[0] = False
                    # the steps' losses in one copy (never a view: the next step donates the vector)
                    yield np.array(lv)[j0:j], None, batch_size, j - j0, None
                    continue
                if kk > 1 and j + kk <= n_full:
                    check_lrs(j, j + kk)
                    losses, _, _ = call(size, kk, j)
                    j += kk
                    yield losses, None, size, kk, None
                    continue
                check_lrs(j, j + 1)
                loss, out, yb = call(size, one, j)
                j += 1
                yield loss, out, size, 1, yb
        finally:
            if len(got) == 2 and got[1][0] is not held[0]:  # a Ctrl-C as a call returned (see _kept): its results are
                held[:] = got[1][:5]  # the only copies of what it donated; its steps were never counted
                eng.count += got[0]
            if sync and len(got) == 2 and got[1][0] is held[0]:
                publish(entries, buf_entries, *held[:3])  # (a no-op where call() published already)
            if not sync and pk is None:
                publish(entries, buf_entries, *held[:3])
            elif not sync and not any(v.is_deleted() for v in held[0]):
                publish(entries, buf_entries, *pk.unpack_call(held[0]))
            elif not sync:  # interrupted inside a call that donated them: the model keeps the values it had before
                eng.count = count0  # the epoch (never donated), and the count goes back with them
            opt.steps = start + eng.count - count0  # fit's count of the steps whose values the model now holds
            for slot in host:  # the steps that read these buffers wrote this last
                host[slot][1] = held[4]
            spare.clear()
            if not held[4].is_deleted():  # (a call interrupted in the middle donated it)
                spare[len(sizes), device] = held[4]

    def leaves_rows(a):
        return jax.tree_util.tree_leaves(a)[0].shape[0]

    def on_device(a, order, slot):
        """An epoch array on the model's device, converted as a batch would be (float64 as float32), its
        rows in ``order`` (None: as they are). A NumPy array is put in order on the host (NumPy's gather is
        ~5x XLA's on CPU), into a buffer kept for the next epoch, and copied to the device once
        (``device_put``: ~7x faster than ``jnp.asarray``)."""
        if type(a) is np.ndarray and a.dtype.kind in "biuf":
            a = convert(a)
            if order is None:  # the user's own array is copied, never aliased
                return get_backend(model.backend).from_numpy(a, model.device, copy=True)
            return shown(gathered(a, order, slot), slot)
        a = model.convert_inputs(a)[0]
        return a if order is None else _permute(a, order.astype(np.int32))

    def gathered(a, order, slot):
        """``a[order]`` in the host buffer of input ``slot``, kept between epochs (up to HOST_BUFFER_BYTES):
        writing into memory used before costs 0.3x-0.9x a fresh array (no page faults), and on CPU the device
        array is that memory itself (64-byte aligned: ``device_put`` copies nothing). Before the buffer is
        written again, the steps that read it (the last epoch's) are waited for."""
        if a.nbytes > HOST_BUFFER_BYTES:
            return a[order]
        buf, last, _ = host.get(slot, (None, None, None))
        if buf is None or buf.shape != a.shape or buf.dtype != a.dtype or (last is not None and last.is_deleted()):
            raw = np.empty(a.nbytes + 64, np.uint8)
            start = -raw.ctypes.data % 64
            buf = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
        elif last is not None:
            jax.block_until_ready(last)
        np.take(a, order, axis=0, out=buf, mode="clip")  # (order: a permutation) "raise" copies via a buffer
        kept = host.get(slot)
        host[slot] = [buf, None, kept[2] if kept is not None and kept[0] is buf else None]
        return buf

    def shown(buf, slot):
        """The device array of the host buffer of ``slot``: on CPU the one made for an earlier epoch, which is
        that memory itself and so shows the rows just written (a ``device_put`` each epoch: ~50-100 us)."""
        kept = host.get(slot)
        if kept is None or kept[0] is not buf:  # rows gathered into an array of their own (above HOST_BUFFER_BYTES)
            return get_backend(model.backend).from_numpy(buf, model.device, copy=False)
        device, dev = kept[2] or (None, None)
        if dev is not None and device == model.device and not dev.is_deleted():
            return dev
        dev = get_backend(model.backend).from_numpy(buf, model.device, copy=False)  # (the buffer is Lamina's own)
        if _buffers(dev) == [buf.ctypes.data]:
            host[slot][2] = (model.device, dev)
        return dev

    def forget():
        """Treat every current value as held by someone else, and look again at what forward reads (``fit``
        calls it where user code ran)."""
        owned.clear()
        stale[0] = True

    def timed(x, y, lr):
        """``step``, timed (with a wait for the result) on a few calls after the first, so that ``group``
        can tell whether grouping steps pays for this model."""
        if timing.k is not None or compile is False:
            return step(x, y, lr)
        t0 = time.perf_counter()
        loss, out = step(x, y, lr)
        jax.block_until_ready(loss)
        timing.single(time.perf_counter() - t0)
        return loss, out

    def group(x) -> int:
        """How many steps fit should run per call: 1 until measured, then 16 for fast steps, else 1."""
        return timing.k or 1

    def convert(a):
        """A batch for the step: NumPy arrays are given to the compiled call as they are (it moves them to
        the device itself, ~10x cheaper than ``jax.device_put`` first), floating ones as float32."""
        if type(a) is np.ndarray and a.dtype.kind in "biuf":
            return a.astype(np.float32) if a.dtype == np.float64 else a
        return model.convert_inputs(a)[0]

    timed.compiled = run  # exposed so tests can count compilations
    timed.convert = convert if compile is not False else None
    timed.many = None if run_many is None else step_many
    timed.group = group
    timed.forget = forget
    timed.epoch = epoch
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
        # the state dict whose arrays this engine made and nobody else was given (state_dict and export hand
        # out copies): ``step`` donates those to XLA, which updates them in place (measured on CPU: Adam's
        # update of a 784-512-512-10 MLP 1.4x faster). A state set from outside (make_step's) is not donated.
        self._mine = self.state
        self._update = jax.jit(self.update_all)
        self._update_donating = jax.jit(self.update_all, donate_argnums=(1,))
        self._version = None  # the structure version ``step`` last checked the entries against

    def update_all(self, grads, state, params, scalars):
        """Each parameter's ``optimizer.update``; the new values and state keep the dtypes they had (the float32
        scalars would promote a float16 parameter: torch keeps the declared dtype too)."""
        new_params, new_state = {}, {}
        update = self.optimizer.update
        for k, p in params.items():
            new, slots = update(p, grads[k], state[k], scalars, jnp)
            new_params[k] = new.astype(p.dtype)
            new_state[k] = {s: v.astype(state[k][s].dtype) if s in state[k] else v for s, v in slots.items()}
        return new_params, new_state

    def ensure(self, entries):
        names = [k for k, _ in entries]
        if names != self.names:
            slots = self.optimizer.slots
            old = self.state
            self.state = {k: old[k] if k in old else {s: jnp.zeros_like(p.value) for s in slots} for k, p in entries}
            self._mine = self.state if old is self._mine else None
            if not self.names:
                self.count = 0
            self.names = names

    def step(self, entries, grads, lr):
        version = context.structure_version()
        if version != self._version:  # the entries only change with the structure (or a trainable flag)
            self.ensure(entries)
            self._version = version
        params = {k: p.value for k, p in entries}
        update = self._update_donating if self.state is self._mine else self._update
        got: list = []
        try:
            self._commit(entries, *_kept(update, ({k: grads[k] for k in params}, self.state, params,
                                                  self.optimizer.scalars(lr, self.count + 1)), got, 1))
        except BaseException:
            if len(got) == 2:  # a Ctrl-C as the call returned (see _kept), or inside _commit: it donated the old
                self._commit(entries, *got[1])  # state, so the update is finished (a Ctrl-C in a user's own
                self.optimizer.steps += 1  # loop: no fit defers it), and counted (Optimizer.step would once this
            raise  # returned)

    def _commit(self, entries, new: dict, state: dict) -> None:
        """Take an update's new values and state; again after an interrupt, it finishes what is left."""
        if self.state is not state:
            self.state = self._mine = state
            self.count += 1
        for k, p in entries:
            p.set_value(new[k], trusted=True)

    def state_dict(self, entries):
        self.ensure(entries)
        slots = self.optimizer.slots  # copies: the step may donate the originals
        return pack_state({k: {s: jnp.array(self.state[k][s], copy=True) for s in slots} for k in self.names},
                          slots, jnp.float32(self.count))

    def export(self) -> dict:
        """The state as host arrays, without entries (the parameters may have left this backend)."""
        if not self.names:
            return {}
        out = {f"{k}/{s}": np.array(a) for k in self.names for s, a in self.state[k].items()}  # copies
        out.update({f"{k}/step": np.float32(self.count) for k in self.names})
        return out

    def load_state_dict(self, entries, arrays):
        self.ensure(entries)
        if not arrays:
            self.state = self._mine = {k: {s: jnp.zeros_like(p.value) for s in self.optimizer.slots}
                                       for k, p in entries}
            self.count = 0
            return
        self.state = self._mine = {k: {s: jnp.array(np.array(arrays[f"{k}/{s}"]), dtype=p.value.dtype)
                                       for s in self.optimizer.slots} for k, p in entries}
        self.count = int(np.asarray(arrays[f"{self.names[0]}/step"]).reshape(-1)[0]) if self.names else 0


def make_forward(model):
    """``forward(*args, **kwargs)``: ``model``'s forward as one ``jax.jit`` program per input shape (and
    per combination of module modes), with the current parameters and buffers passed as arguments, so that
    later updates of the weights are seen without compiling again. Nothing is donated. Buffer writes made
    in training mode (BatchNorm's running statistics) are stored back, and arrays that forward assigns to
    module attributes (``self.attention_weights = w``) are set to their values after each call, as an
    eager call leaves them. Plain Python values (``self.k = 5.0``) are read when jax traces, like
    ``jax.jit``: after changing one, build the forward again (``lm.compile(model)``)."""
    from ..functional import _swapped

    uses_keys = [None]
    targets: dict = {}  # "<id of module>.<name>" -> (module, name): attributes forward sets, seen when traced

    def pure(modes, values, seed, args, kwargs):
        carried: list = []
        with random.key_scope(jax.random.key(seed)) as scope:
            with _swapped(model, values, carried) as writes:
                out = model(*args, **kwargs)
            writes = dict(writes)
        if scope[1]:
            uses_keys[0] = True
        return out, writes, carry_out(carried, targets)

    run = jax.jit(pure, static_argnums=(0,))
    lay: dict = {"v": None}
    zero = np.uint32(0)

    def forward(*args, **kwargs):
        model.ensure_built(*args, **kwargs)
        version = context.structure_version()
        if lay["v"] != version:
            lay.update(v=version, entries=list(model.named_parameters()) + list(model.named_buffers()),
                       modules=list(model.modules()))
        modes = tuple(m.training for m in lay["modules"])
        values = {k: p.value for k, p in lay["entries"]}
        seed = zero if uses_keys[0] is False else np.uint32(random.next_seed())
        args, kwargs = _native(model, args), {k: _native(model, v) for k, v in kwargs.items()}
        out, writes, attrs = run(modes, values, seed, args, kwargs)
        if uses_keys[0] is None:
            uses_keys[0] = False
        if writes:
            paths = dict(lay["entries"])
            for k, v in writes.items():
                paths[k].set_value(v, trusted=True)
        carry_in(attrs, targets)
        return out

    forward.compiled = run  # exposed so tests can count compilations
    return forward


def _kept(run, args: tuple, into: list, steps: int):
    """``run(*args)``, also left in ``into`` as ``[steps, result]`` the moment it returns (``[steps]`` while it
    runs, or after it raised). Python raises a Ctrl-C that came during a call when the call returns, before its
    result is bound to a name; a compiled step's result is then the only copy of the values it was given
    (donated), so the caller's ``finally`` takes it from ``into``. (``starmap`` calls ``run`` from C, and
    ``extend`` stores the result before Python checks for signals again.)"""
    into.clear()
    into.append(steps)
    into.extend(starmap(run, (args,)))
    return into[1]


def _adopt_unshared(entries, buf_entries, state: dict, owned: dict) -> None:
    """Put into ``owned`` (safe to donate) each parameter or buffer value that only Lamina refers to (the
    parameter and its owners' ``__dict__``, where ``forward`` reads it) and each optimizer state array that
    only the engine's state refers to, so that it is donated without the protective copy (copying the
    784-512-512-10 MLP's parameters and Adam moments cost 2-3% of a 32-step ``fit`` call). Two checks, and
    any doubt means a copy:

    - the Python reference count of the array object (a ``state_dict()`` snapshot, an array assigned or
      loaded, one a callback kept, a NumPy view of it: each adds one);
    - no other live jax array on the same buffer: ``jax.device_put`` onto an array's own device (as
      ``model.to`` and ``place_model`` do, or a user) makes a second array object on the buffer, which the
      first one's count does not see (~1 us per live array in the process: a user's 1,000 pre-made batches
      cost more than copying a small model, so only from ADOPT_FROM_BYTES of values on).

    (A DLPack export or a NumPy view holds the buffer itself: XLA then declines the donation.)"""
    values = (p.value for entry in (entries, buf_entries) for _, p in entry)  # (no list: it would hold them)
    if sum(a.nbytes for a in values) * (1 + max(map(len, state.values()), default=0)) < ADOPT_FROM_BYTES:
        return  # even all of them together: copying costs less than looking
    found = []
    for entry in (entries, buf_entries):
        for _, p in entry:
            v = p.value
            if only_held_by(p.own_references(), v):
                found.append(v)
    for slots in state.values():
        found += [a for a in slots.values() if only_held_by(1, a)]  # the state's dict
    if sum(a.nbytes for a in found) < ADOPT_FROM_BYTES:  # copying them costs less than looking
        return
    users: dict = {}  # buffer -> how many live arrays are on it
    for platform in {d.platform for a in found for d in a.devices()}:
        for a in jax.live_arrays(platform):
            for b in _buffers(a):
                users[b] = users.get(b, 0) + 1
    for a in found:
        buffers = _buffers(a)
        if buffers and all(users.get(b) == 1 for b in buffers):
            owned[id(a)] = a


def _on_devices_of(state: dict, entries) -> dict:
    """``state`` ({name: {slot: array}}) with the arrays of each parameter (``entries``: (name, Parameter))
    that moved to other devices since (``model.to``) put on that parameter's devices, laid out as it is there.
    (Holds no reference to a value once it returns: ``_adopt_unshared`` counts them.)"""
    moved = {}
    for k, p in entries:
        slots = state.get(k, {})
        if any(a.devices() != p.value.devices() for a in slots.values()):
            moved[k] = {s: jax.device_put(a, p.value.sharding) for s, a in slots.items()}
    return {**state, **moved} if moved else state


def _buffers(a) -> list:
    """The device buffers of ``a`` (one per addressable shard), or [] where they cannot be read."""
    try:
        if len(a.devices()) == 1:
            return [a.unsafe_buffer_pointer()]
        return [s.data.unsafe_buffer_pointer() for s in a.addressable_shards]
    except Exception:  # deleted, or a platform without raw pointers: counts as unknown
        return []


def _copy_foreign(tree, owned: dict, host=None):
    """``(tree, host)`` with every array of ``tree`` that is not in ``owned`` (by id) replaced by a copy, and
    the NumPy array ``host`` (or None) sent to the device of ``tree``'s first array, all in one compiled call,
    committed to their device (see ``_committed``)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    where = [i for i, a in enumerate(leaves) if owned.get(id(a)) is not a]
    devices = leaves[0].devices() if leaves else ()
    if len(devices) > 1:  # sharded values: the table goes to one of their devices, by itself
        host = None if host is None else jax.device_put(host, next(iter(devices)))
        copies, _ = _selected([leaves[i] for i in where], np.bool_(True), None)
    else:  # (a committed argument puts the table on the device)
        copies, host = _selected([leaves[i] for i in where], true_on(next(iter(devices), None)), host)
    for i, a in zip(where, copies):
        leaves[i] = _committed(a)
    return jax.tree_util.tree_unflatten(treedef, leaves), (None if host is None else _committed(host))


def _committed(a):
    """``a`` committed to its device (the same buffer): a compiled step's outputs are committed, and jax
    compiles a program again when an argument changes from uncommitted to committed (measured: a second
    0.35 s compilation of the MLP's step on every model's first ``fit``)."""
    return a if a.committed else jax.device_put(a, next(iter(a.devices())))


@jax.jit
def _selected(arrays, keep, host):
    """Copies of ``arrays`` in new buffers, and of ``host`` (a NumPy array, or None), on ``keep``'s device
    (``copied``)."""
    return [copied(a, keep) for a in arrays], None if host is None else copied(host, keep)


@jax.jit
def _permute(a, order):
    """The rows of ``a`` in the order ``order``."""
    return jnp.take(a, order, axis=0)


def _last(stacked: dict) -> dict:
    """The last step's values of attributes a scan of steps stacked (the last assignment wins)."""
    return {k: v[-1] for k, v in stacked.items()}


def _native(model, a):
    """An argument for the compiled forward: NumPy arrays (and containers of them) as jax arrays."""
    if isinstance(a, np.ndarray | list | tuple | dict):
        return model.convert_inputs(a)[0]
    return a
