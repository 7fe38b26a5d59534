"""Several jax processes (``jax.distributed.initialize``), behind the interface of ``training/torch_dist.py``
that ``lamina.process_group`` calls by name (``training.GROUPS``). Imported only once jax is.

Everything goes through jax's own multi-process tools (``jax.experimental.multihost_utils``): the barrier is
``sync_global_devices``; Python objects travel pickled, as ``uint8`` arrays padded to a common length (the
lengths are exchanged first), through ``broadcast_one_to_all`` and ``process_allgather``. Every process must
make the same calls in the same order, as with any collective.
"""

from __future__ import annotations

import pickle

import jax
import numpy as np

__all__ = ["is_active", "rank", "world_size", "barrier", "broadcast", "all_gather", "full_value", "initialize"]


def is_active() -> bool:
    """Whether this program runs as one of several jax processes."""
    try:
        return jax.process_count() > 1
    except RuntimeError:
        return False


def rank() -> int:
    return jax.process_index()


def world_size() -> int:
    return jax.process_count()


def _utils():
    from jax.experimental import multihost_utils

    return multihost_utils


def barrier() -> None:
    """Wait until every process gets here."""
    _utils().sync_global_devices("lamina.barrier")


def _encode(obj) -> np.ndarray:
    return np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)


def broadcast(obj):
    """``obj`` as process 0 has it (a picklable object)."""
    mu = _utils()
    data = _encode(obj) if rank() == 0 else np.zeros(0, np.uint8)
    n = int(mu.broadcast_one_to_all(np.int32(data.size)))
    buf = np.zeros(n, np.uint8)
    buf[:data.size] = data[:n]
    return pickle.loads(np.asarray(mu.broadcast_one_to_all(buf)).tobytes())


def all_gather(obj) -> list:
    """Every process's ``obj`` (a picklable object), by process index."""
    mu = _utils()
    data = _encode(obj)
    sizes = np.asarray(mu.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    rows = np.asarray(mu.process_allgather(buf)).reshape(len(sizes), -1)
    return [pickle.loads(row[:n].tobytes()) for row, n in zip(rows, sizes)]


def full_value(v):
    """The whole value of an array spread over several processes; any other value as it is."""
    if hasattr(v, "is_fully_addressable") and not v.is_fully_addressable:
        return _utils().process_allgather(v, tiled=True)
    return v


def initialize(backend: str | None = None, timeout: float = 300.0) -> None:
    """Join the jax processes: ``jax.distributed.initialize`` with what jax detects (Slurm, Open MPI, Cloud
    TPU), waiting at most ``timeout`` seconds for the others. Elsewhere, call
    ``jax.distributed.initialize(coordinator_address=..., num_processes=..., process_id=...)`` yourself."""
    jax.distributed.initialize(initialization_timeout=int(timeout))
