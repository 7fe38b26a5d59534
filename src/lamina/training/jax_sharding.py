"""Data-parallel and FSDP-style training on jax for ``fit``, with ``jax.sharding`` annotations only.

The parameters (and buffers and optimizer state) are placed on a device mesh, replicated or, with
``shard_params=True``, split along their first axis over the data axis where it divides evenly; each batch
is placed split over the data axis. The train step of ``training/jax.py`` is then compiled by ``jax.jit`` for
arrays with these shardings, so it is one SPMD program: XLA inserts the gradient all-reduce (or the
all-gathers and reduce-scatters of FSDP) itself. With several jax processes (``jax.distributed.initialize``),
the mesh spans every process's devices and each process feeds its own part of every global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..backends import get_backend
from ..distributed import DataParallel, DistributedError, Plan

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
    along the first axis over ``axis`` (where it divides) with ``shard_params``."""
    n = mesh.shape[axis]
    where = {}
    for path, p in [*model.named_parameters(), *model.named_buffers()]:
        s = NamedSharding(mesh, _spec(tuple(p.shape), n, axis, shard_params))
        where[path] = s
        v = p.value
        if getattr(v, "sharding", None) != s:
            p.set_value(_put(v, s), trusted=True)
    if optimizer is not None:
        eng = optimizer.engine(get_backend(model.backend))
        entries = optimizer.entries()
        eng.ensure(entries)
        for k, _ in entries:
            s = where.get(k) or NamedSharding(mesh, P())
            eng.state[k] = {slot: _put(a, s) for slot, a in eng.state[k].items()}


def _put(a, sharding):
    if jax.process_count() == 1:
        return jax.device_put(a, sharding)
    # several processes: every process holds the same full value; each keeps the shards of its devices
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


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
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)

    def seed(self, seed):
        if self.world == 1 or seed is not None:
            return seed
        from jax.experimental import multihost_utils

        return int(multihost_utils.broadcast_one_to_all(np.int64(np.random.SeedSequence().generate_state(1)[0])))

    def evaluate(self, evaluate, model, loss, data, metrics, batch_size) -> dict:
        if self.world > 1:
            raise DistributedError("fit(validation_data=...) with several jax processes is not supported yet: "
                                   "evaluate after training with lm.evaluate on a model gathered to one process")
        return evaluate(model, loss, data, metrics=metrics, batch_size=batch_size)

    def wrap(self, step, model, loss, optimizer, compile, outputs):
        placed = [False]
        convert = getattr(step, "convert", None) or (lambda a: model.convert_inputs(a)[0])

        def ensure_placed():
            if not placed[0] and model.is_built:
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
            return step(x, y, lr)

        run.convert = put
        run.many = None
        run.group = lambda x: 1
        run.forget = getattr(step, "forget", None)
        run.mesh = self.mesh
        return run
