"""Several jax processes (``jax.distributed.initialize``), behind the interface of ``training/torch_dist.py``
that ``lamina.process_group`` calls by name (``training.GROUPS``). Imported only once jax is.

Everything goes through jax's own multi-process tools (``jax.experimental.multihost_utils``): the barrier is
``sync_global_devices``; Python objects travel pickled, as ``uint8`` arrays padded to a common length (the
lengths are exchanged first), through ``broadcast_one_to_all`` and ``process_allgather``. Every process must
make the same calls in the same order, as with any collective.

A process that dies: jax's collectives (gloo on CPU) fail at once on its closed connections (and, after
:func:`initialize`, a CPU collective that waits for another process longer than the timeout fails too). A
collective that fails so, here or in ``fit``'s train step (``jax_sharding.py``), is raised as a
``lamina.distributed.DistributedError`` (:func:`collective`). This process then exits with status 1 when
Python ends (:func:`_exit_after_failure`), instead of waiting in jax's shutdown for the dead process until the
heartbeat timeout and then aborting. jax itself ends the process, with a fatal error that Python cannot catch
(exit status 134), when process 0 (which runs jax's coordination service) is gone, or when a process has sent
no heartbeat for ``heartbeat_timeout_seconds`` (:func:`initialize` sets it).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import re
import sys

import jax
import numpy as np

from ..distributed import DistributedError

__all__ = ["is_active", "rank", "world_size", "barrier", "broadcast", "all_gather", "full_value", "initialize",
           "collective"]

#: what jax's runtime errors say when a collective fails (they start with a status code, e.g. "UNKNOWN: ")
_COLLECTIVE_FAILED = re.compile(r"^[A-Z_]+: (?is:.*(gloo|nccl|\bmpi\b|collective))")
_failed = [False]  # a collective of this process failed: another process stopped answering


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


@contextlib.contextmanager
def collective(what: str):
    """Run ``what`` (collectives): if one fails because another process stopped answering, raise a
    :class:`~lamina.distributed.DistributedError` that says so (jax raises a ``JaxRuntimeError``, or a
    ``ValueError``, naming gloo or NCCL)."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, ValueError) as e:
        if not _COLLECTIVE_FAILED.match(str(e)):
            raise
        _failed[0] = True
        raise DistributedError(
            f"jax process {jax.process_index()}: {what} failed because another jax process stopped answering "
            f"(it died, or did not get there within the timeout; jax says: {str(e).splitlines()[0]}). Look at the "
            "other processes' output for the first error, then start every process again (from your last "
            "checkpoint). This process exits with status 1 when Python ends") from e


@atexit.register  # after jax's own exit handler (jax is imported above), so it runs before it
def _exit_after_failure() -> None:
    """After a failed collective, end the process with status 1 at exit: jax's shutdown would wait for the
    dead process (up to the heartbeat timeout) and then abort the process with a fatal error."""
    if not _failed[0]:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed stream: nothing to flush
            pass
    os._exit(1)


def _utils():
    from jax.experimental import multihost_utils

    return multihost_utils


def barrier() -> None:
    """Wait until every process gets here."""
    with collective("the barrier"):
        _utils().sync_global_devices("lamina.barrier")


def _encode(obj) -> np.ndarray:
    return np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)


def broadcast(obj):
    """``obj`` as process 0 has it (a picklable object)."""
    mu = _utils()
    data = _encode(obj) if rank() == 0 else np.zeros(0, np.uint8)
    with collective("a broadcast from process 0"):
        n = int(mu.broadcast_one_to_all(np.int32(data.size)))
        buf = np.zeros(n, np.uint8)
        buf[:data.size] = data[:n]
        got = np.asarray(mu.broadcast_one_to_all(buf))
    return pickle.loads(got.tobytes())


def all_gather(obj) -> list:
    """Every process's ``obj`` (a picklable object), by process index."""
    mu = _utils()
    data = _encode(obj)
    with collective("gathering from every process"):
        sizes = np.asarray(mu.process_allgather(np.array([data.size], np.int32))).reshape(-1)
        buf = np.zeros(int(sizes.max()), np.uint8)
        buf[:data.size] = data
        rows = np.asarray(mu.process_allgather(buf)).reshape(len(sizes), -1)
    return [pickle.loads(row[:n].tobytes()) for row, n in zip(rows, sizes)]


def full_value(v):
    """The whole value of an array spread over several processes; any other value as it is."""
    if hasattr(v, "is_fully_addressable") and not v.is_fully_addressable:
        with collective("gathering an array from every process"):
            return _utils().process_allgather(v, tiled=True)
    return v


def initialize(backend: str | None = None, timeout: float = 300.0, **where) -> None:
    """Join the jax processes: ``jax.distributed.initialize(**where)`` (``coordinator_address``,
    ``num_processes``, ``process_id``, ...; none: what jax detects, e.g. Slurm, Open MPI, Cloud TPU).

    ``timeout`` (seconds) is jax's ``initialization_timeout`` (the wait for the others to join) and
    ``heartbeat_timeout_seconds`` (a process silent that long counts as dead, and jax then ends the others)
    unless ``where`` names them, and the timeout of a CPU collective (``--xla_cpu_collective_timeout_seconds``)
    unless ``XLA_FLAGS`` names it: one that waits longer for another process fails. A process that dies on a
    running machine is noticed sooner, by the next collective (see the module docstring). ``backend``: jax's
    CPU collectives, ``"gloo"`` (jax's default) or ``"mpi"``."""
    if backend is not None:
        jax.config.update("jax_cpu_collectives_implementation", backend)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_collective_timeout_seconds" not in flags:  # read when jax starts its CPU backend, after this
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_collective_timeout_seconds={int(timeout)}".strip()
    jax.distributed.initialize(**{"initialization_timeout": int(timeout), "heartbeat_timeout_seconds": int(timeout),
                                  **where})
