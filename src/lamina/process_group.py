"""The process group a program runs in: rank, world size, barrier (torch.distributed under torchrun, or
several jax processes), without importing a backend that the program does not use. Which group is which
is known only to the process-group rooms of ``training/`` (``training.GROUPS``)."""

from __future__ import annotations

from .training import GROUPS, active_group, group_room

__all__ = ["initialize", "rank", "world_size", "is_main", "barrier", "broadcast", "all_gather"]


def initialize(backend: str | None = None, timeout: float = 300.0, *, framework: str = "torch") -> None:
    """Join the process group of ``framework`` (default: the torch process group that ``torchrun`` describes:
    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...), with a timeout (seconds) after which a collective that
    waits for a dead or stuck rank fails instead of hanging. ``backend``: the collective library,
    ``"nccl"`` where CUDA is available, else ``"gloo"``."""
    room = group_room(framework)
    if room is None:
        raise ValueError(f"initialize: no process group for {framework!r}; expected one of "
                         f"{sorted(GROUPS)}")
    room.initialize(backend, timeout)


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
