"""Several jax processes (``jax.distributed.initialize``), behind the interface of ``training/torch_dist.py``
that ``lamina.process_group`` calls by name (``training.GROUPS``). Imported only once jax is."""

from __future__ import annotations

import jax

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


def barrier() -> None:
    """Nothing yet: jax's own collectives synchronize the processes (as before this room existed)."""


def broadcast(obj):
    """``obj`` as it is: jax sends arrays, not Python objects (as before this room existed, each process
    keeps its own value)."""
    return obj


#: jax gathers arrays, not Python objects: ``check_same_model`` has nothing to compare with
all_gather = None


def full_value(v):
    """The whole value of an array spread over several processes; any other value as it is."""
    if hasattr(v, "is_fully_addressable") and not v.is_fully_addressable:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(v, tiled=True)
    return v


def initialize(backend: str | None = None, timeout: float = 300.0) -> None:
    """Join the jax processes (``jax.distributed.initialize`` with its environment's defaults)."""
    jax.distributed.initialize()
