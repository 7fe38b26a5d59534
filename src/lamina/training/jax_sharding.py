"""Data-parallel and FSDP-style training on jax for ``fit``, with ``jax.sharding`` annotations only.

The parameters (and buffers and optimizer state) are placed on a device mesh, replicated or, with
``shard_params=True``, split along their first axis over the data axis where it divides evenly; each batch
is placed split over the data axis. The train step of ``training/jax.py`` is then compiled by ``jax.jit`` for
arrays with these shardings, so it is one SPMD program: XLA inserts the gradient all-reduce (or the
all-gathers and reduce-scatters of FSDP) itself. With several jax processes (``jax.distributed.initialize``),
the mesh spans every process's devices and each process feeds its own part of every global batch; each
step is waited for, so that a step whose collectives fail because another process died raises a
``DistributedError`` (``jax_dist.collective``) instead of jax's error surfacing later, wherever the loss is read.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..backends import get_backend
from ..distributed import DataParallel, DistributedError, Plan, check_same_model
from .jax_dist import all_gather, broadcast, collective, full_value

__all__ = ["plan", "mesh_of", "place_model"]


def plan(model, parallel):
    """A :class:`JaxPlan` for ``parallel`` (None: no plan, unless several jax processes run)."""
    if parallel is None:
        if jax.process_count() == 1:
            return None
        parallel = DataParallel()
    return JaxPlan(model, parallel)


def mesh_of(parallel: DataParallel) -> Mesh:
    """The mesh that ``parallel`` names: its own, or a 1-D mesh over the chosen devices."""
    if parallel.mesh is not None:
        if parallel.axis not in parallel.mesh.axis_names:
            raise DistributedError(f"DataParallel: the mesh has axes {parallel.mesh.axis_names}, not the data axis "
                                   f"{parallel.axis!r}; pass axis= one of them")
        return parallel.mesh
    devices = jax.devices()
    if parallel.devices == "all":
        chosen = devices
    elif isinstance(parallel.devices, int):
        if parallel.devices > len(devices):
            raise DistributedError(f"DataParallel(devices={parallel.devices}) but jax sees {len(devices)} device(s) "
                                   f"({devices[0].platform}); on CPU, set XLA_FLAGS="
                                   f"--xla_force_host_platform_device_count={parallel.devices} before jax starts")
        chosen = devices[:parallel.devices]
    else:
        chosen = list(parallel.devices)
    return Mesh(np.array(chosen), (parallel.axis,))


def _spec(shape, n: int, axis: str, shard: bool) -> P:
    if shard and len(shape) > 0 and shape[0] % n == 0 and shape[0] >= n:
        return P(axis)
    return P()


def place_model(model, optimizer, mesh: Mesh, axis: str = "data", shard_params: bool = False) -> None:
    """Put ``model``'s parameters and buffers (and ``optimizer``'s state) on ``mesh``: replicated, or split
    along the first axis over ``axis`` (where it divides) with ``shard_params``. With several processes,
    every process starts from process 0's values (as DDP starts every rank from rank 0's)."""
    n = mesh.shape[axis]
    replicated = NamedSharding(mesh, P())
    items = [*model.named_parameters(), *model.named_buffers()]
    where = {path: NamedSharding(mesh, _spec(tuple(p.shape), n, axis, shard_params)) for path, p in items}
    moves = {("value", path): (p.value, where[path]) for path, p in items}  # and ("state", path, slot)
    eng = None
    if optimizer is not None:
        eng = optimizer.engine(get_backend(model.backend))
        entries = optimizer.entries()
        eng.ensure(entries)
        for k, _ in entries:
            moves.update({("state", k, slot): (a, where.get(k, replicated)) for slot, a in eng.state[k].items()})
    moves = {key: (a, s) for key, (a, s) in moves.items() if getattr(a, "sharding", None) != s}
    placed = _put(moves)
    for path, p in items:
        if ("value", path) in placed:
            p.set_value(placed["value", path], trusted=True)
    if eng is not None:
        for key, a in placed.items():
            if key[0] == "state":
                eng.state[key[1]] = {**eng.state[key[1]], key[2]: a}


def _put(moves: dict) -> dict:
    """``{key: (array, sharding)}`` -> ``{key: the array placed with that sharding}``."""
    if jax.process_count() == 1:
        return {key: jax.device_put(a, s) for key, (a, s) in moves.items()}
    # several processes: process 0's whole values go to every process, and each keeps its devices' shards
    host = broadcast({key: np.asarray(full_value(a)) for key, (a, _) in moves.items()})
    return {key: jax.make_array_from_callback(host[key].shape, s, lambda idx, h=host[key]: h[idx])
            for key, (_, s) in moves.items()}


class JaxPlan(Plan):
    """``fit``'s plan on a jax mesh (see ``lamina.distributed``)."""

    def __init__(self, model, parallel):
        self.parallel = parallel
        self.mesh = mesh_of(parallel)
        self.axis = parallel.axis
        self.rank, self.world = jax.process_index(), jax.process_count()
        self.is_main = self.rank == 0
        self.n = self.mesh.shape[self.axis]
        self.batch = NamedSharding(self.mesh, P(self.axis))
        self.replicated = NamedSharding(self.mesh, P())

    def reduce(self, values) -> np.ndarray:
        values = np.asarray(values, np.float64)
        if self.world == 1:
            return values
        return np.sum(all_gather(values), axis=0)  # float64 as it is (jax arrays would be float32)

    def seed(self, seed):
        if self.world == 1 or seed is not None:
            return seed
        return broadcast(int(np.random.SeedSequence().generate_state(1)[0]))

    def check(self, model) -> None:
        if self.world > 1:
            check_same_model(model)

    def evaluate(self, evaluate, model, loss, data, metrics, batch_size) -> dict:
        """One process: ``evaluate`` as usual (the batches meet the parameters on the mesh). Several: each
        process evaluates its part of ``data`` on a local copy of the whole model (gathered), and the means
        are combined over the processes by row count."""
        if self.world == 1:
            return evaluate(model, loss, data, metrics=metrics, batch_size=batch_size)
        items = [*model.named_parameters(), *model.named_buffers()]
        held = [p.value for _, p in items]
        local = [jax.device_put(np.asarray(full_value(v)), jax.local_devices()[0]) for v in held]
        try:
            for (_, p), v in zip(items, local):
                p.set_value(v, trusted=True)
            return super().evaluate(evaluate, model, loss, data, metrics, batch_size)
        finally:
            for (_, p), v in zip(items, held):
                p.set_value(v, trusted=True)

    def wrap(self, step, model, loss, optimizer, compile, outputs):
        placed = [False]
        convert = getattr(step, "convert", None) or (lambda a: model.convert_inputs(a)[0])

        def ensure_placed():
            if not placed[0] and model.is_built:
                self.check(model)  # before any collective of the step: differing models fail here, by name
                place_model(model, optimizer, self.mesh, self.axis, self.parallel.shard_params)
                if getattr(step, "forget", None) is not None:
                    step.forget()
                placed[0] = True

        def put(a):
            if isinstance(a, dict):
                return {k: put(v) for k, v in a.items()}
            if isinstance(a, tuple | list):
                return type(a)(put(v) for v in a)
            a = convert(a)
            if not placed[0] and not model.is_built:  # the first batch (inputs come before targets): build on it,
                model.ensure_built(a)                  # unsharded, so the dry run sees arrays on one device
            ensure_placed()  # before the batch meets the parameters
            rows = a.shape[0] * (self.world if self.world > 1 else 1)
            s = self.batch if rows % self.n == 0 else self.replicated
            if self.world > 1:
                return jax.make_array_from_process_local_data(s, np.asarray(a))
            return jax.device_put(a, s)

        def run(x, y, lr):
            ensure_placed()
            if self.world == 1:
                return step(x, y, lr)
            with collective("a train step"):  # waits for the step, so that a dead process is named here
                loss, out = step(x, y, lr)
                jax.block_until_ready(loss)
            return loss, out

        run.convert = put
        run.many = None
        run.group = lambda x: 1
        run.forget = getattr(step, "forget", None)
        run.mesh = self.mesh
        return run
