"""The torch process group (``torch.distributed``, as ``torchrun`` sets it up), behind the small interface that
``lamina.process_group`` calls by name (``training.GROUPS``): ``is_active``, ``rank``, ``world_size``,
``barrier``, ``broadcast``, ``all_gather``, ``full_value`` and ``initialize``. Imported only once torch is."""

from __future__ import annotations

import atexit
import datetime

import torch
import torch.distributed as dist

__all__ = ["is_active", "rank", "world_size", "barrier", "broadcast", "all_gather", "full_value", "initialize"]

#: how long a rank that exits waits for the others to exit too (gloo), before it leaves the group alone
EXIT_WAIT_S = 10


def is_active() -> bool:
    """Whether a torch process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank()


def world_size() -> int:
    return dist.get_world_size()


def barrier() -> None:
    dist.barrier()


def broadcast(obj):
    """``obj`` as rank 0 has it (a picklable object)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj) -> list:
    """Every rank's ``obj``, by rank."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def full_value(v):
    """The whole value of a sharded tensor (an FSDP2 ``DTensor``); any other value as it is."""
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def initialize(backend: str | None = None, timeout: float = 300.0) -> None:
    """Join the process group that ``torchrun`` describes; ``backend``: ``"nccl"`` where CUDA is available,
    else ``"gloo"``."""
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    atexit.register(_shut_down)


def _shut_down() -> None:
    """Leave the process group this process joined through Lamina before the interpreter exits: a group left
    to its destructor can abort the process ("terminate called without an active exception"), seen after a
    training run that stopped with an error."""
    try:
        if dist.is_initialized():
            if dist.get_backend() == "gloo":  # leave together: a rank that tore its group down while another
                # was still using it aborted the same way (1 run in 4 of the uneven-batches test)
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=EXIT_WAIT_S))
            dist.destroy_process_group()
    except Exception:  # a group another rank already broke: nothing left to close cleanly
        pass
