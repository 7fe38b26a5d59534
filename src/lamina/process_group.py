"""The process group a program runs in: rank, world size, barrier (torch.distributed under torchrun, or
several jax processes), without importing a backend that the program does not use. Which group is which
is known only to the process-group rooms of ``training/`` (``training.GROUPS``)."""

from __future__ import annotations

from .training import GROUPS, active_group, group_room

__all__ = ["initialize", "rank", "world_size", "is_main", "barrier", "broadcast", "all_gather"]


def initialize(backend: str | None = None, timeout: float = 300.0, *, framework: str = "torch", **where) -> None:
    """Join the process group of ``framework``, with a timeout (seconds) that bounds how long the others wait
    for a rank that died before they stop.

    torch (the default): the group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
    ...); ``timeout`` bounds every collective; ``backend``: ``"nccl"`` where CUDA is available, else
    ``"gloo"``. jax: ``jax.distributed.initialize(**where)`` (``coordinator_address="host0:1234",
    num_processes=2, process_id=i``; none where jax detects the cluster: Slurm, Open MPI, Cloud TPU);
    ``timeout`` bounds the start, is jax's heartbeat timeout (a process silent that long counts as dead) and
    the CPU collectives' timeout (``training/jax_dist.py``); ``backend``: jax's CPU collectives, ``"gloo"`` or
    ``"mpi"``. What a dead process does to the others: the README, "Scaling out"."""
    room = group_room(framework)
    if room is None:
        raise ValueError(f"initialize: no process group for {framework!r}; expected one of "
                         f"{sorted(GROUPS)}")
    room.initialize(backend, timeout, **where)


def rank() -> int:
    """This process's rank (0 without a process group)."""
    group = active_group()
    return 0 if group is None else group.rank()


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    group = active_group()
    return 1 if group is None else group.world_size()


def is_main() -> bool:
    """Whether this is rank 0 (the one that shows progress and writes full checkpoints)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    group = active_group()
    if group is not None:
        group.barrier()


def broadcast(obj):
    """``obj`` as rank 0 has it (``obj`` itself without a process group)."""
    group = active_group()
    return obj if group is None or group.world_size() == 1 else group.broadcast(obj)


def all_gather(obj) -> list:
    """Every rank's ``obj`` (a picklable object), by rank: ``[obj]`` without a process group."""
    group = active_group()
    return [obj] if group is None else group.all_gather(obj)
