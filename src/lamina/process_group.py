"""The process group a program runs in: rank, world size, barrier (torch.distributed under torchrun, or
several jax processes), without importing a backend that the program does not use."""

from __future__ import annotations

import sys

__all__ = ["initialize", "rank", "world_size", "is_main", "barrier"]


# ----- process group (torch.distributed when a torch program runs under torchrun) ----------------------
def _torch_dist():
    """``torch.distributed`` if torch is already imported and a process group is up, else None (never imports
    torch: a numpy or jax program pays nothing)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def initialize(backend: str | None = None, timeout: float = 300.0) -> None:
    """Join the torch process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...),
    with a timeout (seconds) after which a collective that waits for a dead or stuck rank fails instead of
    hanging. ``backend``: ``"nccl"`` where CUDA is available, else ``"gloo"``."""
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))


def rank() -> int:
    """This process's rank (0 without a process group)."""
    dist = _torch_dist()
    if dist is not None:
        return dist.get_rank()
    jax = sys.modules.get("jax")
    return jax.process_index() if jax is not None and _jax_multi(jax) else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    dist = _torch_dist()
    if dist is not None:
        return dist.get_world_size()
    jax = sys.modules.get("jax")
    return jax.process_count() if jax is not None and _jax_multi(jax) else 1


def _jax_multi(jax) -> bool:
    try:
        return jax.process_count() > 1
    except RuntimeError:
        return False


def is_main() -> bool:
    """Whether this is rank 0 (the one that shows progress and writes full checkpoints)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    dist = _torch_dist()
    if dist is not None:
        dist.barrier()


