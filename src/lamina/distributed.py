"""Training on several processes or devices, on the engines the field already trusts: ``torch.distributed``
(DistributedDataParallel, FSDP2) and ``jax.sharding``. Nothing here moves a gradient by itself.

``lm.fit`` uses this room in two ways:

- torch: run the same script under ``torchrun`` (so that a process group is initialized, e.g. through
  :func:`initialize`) and ``fit`` trains data-parallel by itself: each rank takes its own disjoint part of
  every epoch's order (one shared shuffling seed), ``DistributedDataParallel`` averages the gradients, the
  bar and logs show on rank 0 only, the epoch's figures (``val_*`` included) are reduced over the ranks,
  every rank stops together and ``lm.Checkpoint`` writes once (rank 0). ``parallel=DataParallel(
  shard_params=True)`` uses FSDP2's ``fully_shard`` instead of DDP; the model and the optimizer state are
  gathered whole at the end of every epoch (see ``training/torch_parallel.py``).
- jax: ``fit(..., parallel=lm.distributed.DataParallel(devices="all"))``: the batch is sharded over the
  ``"data"`` axis of a device mesh and the parameters replicated, or, with ``shard_params=True``, the
  parameters and the optimizer state sharded too (FSDP-style); the compiled step is one SPMD program.
  After ``jax.distributed.initialize`` the same call spans every process's devices.

``batch_size`` is per rank (per process), as with torch's ``DistributedSampler``: 2 ranks with batch 32 take
the same 64 rows per step as 1 process with batch 64. The same holds for several jax processes
(``jax.distributed.initialize``): each process feeds ``batch_size`` rows of every global batch. On jax with
one process and several devices it is the global batch, split over the devices.

Backend-specific parts live in the parallel rooms of ``training/`` (``torch_parallel.py``,
``jax_sharding.py``); this file only knows their names.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Iterator

import numpy as np

from .errors import LaminaError
from .process_group import all_gather, barrier, initialize, is_main, rank, world_size
from .sharded import load_sharded, save_sharded

__all__ = ["DataParallel", "DistributedError", "initialize", "rank", "world_size", "is_main", "barrier",
           "shard_order", "shard_batches", "check_same_model", "save_sharded", "load_sharded"]

#: backend name -> its parallel room
ROOMS = {"torch": "lamina.training.torch_parallel", "jax": "lamina.training.jax_sharding"}


class DistributedError(LaminaError, RuntimeError):
    """Processes of one training disagree (model structure, data) or one of them stopped answering."""


class DataParallel:
    """How ``fit`` should spread training over devices or processes (``fit(..., parallel=...)``).

    ``devices``: ``"all"``, a number of devices (the first ones), or a list of devices (jax); ignored on
    torch, where the process group decides. ``mesh``: a ready ``jax.sharding.Mesh`` (its ``axis`` shards the
    batch). ``shard_params``: shard parameters and optimizer state over the data axis too (FSDP-style on jax;
    on torch, ``fully_shard``) instead of replicating them.

    >>> DataParallel(devices=4, shard_params=True)
    DataParallel(devices=4, mesh=None, axis='data', shard_params=True)
    """

    def __init__(self, devices="all", *, mesh=None, axis: str = "data", shard_params: bool = False):
        if not (devices == "all" or (isinstance(devices, int) and devices > 0) or isinstance(devices, list | tuple)):
            raise ValueError(f"DataParallel: devices must be 'all', a positive int or a list of devices, got "
                             f"{devices!r}")
        self.devices, self.mesh, self.axis, self.shard_params = devices, mesh, axis, bool(shard_params)

    def __repr__(self):
        return (f"DataParallel(devices={self.devices!r}, mesh={self.mesh!r}, axis={self.axis!r}, "
                f"shard_params={self.shard_params!r})")


# ----- the plan that fit follows ---------------------------------------------------------------------------
def plan_for(model, parallel):
    """The parallel plan of ``model`` for ``fit`` (None: train in one process as usual). ``parallel=None``
    means: data-parallel if this process is one of several (a torch process group), else single."""
    if parallel is not None and not isinstance(parallel, DataParallel):
        raise TypeError(f"fit: parallel must be an lm.distributed.DataParallel, got {type(parallel).__name__}")
    room = ROOMS.get(model.backend)
    if room is None:
        if parallel is not None:
            raise DistributedError(f"fit(parallel=...): the {model.backend} backend cannot train in parallel; "
                                   f"use one of {sorted(ROOMS)}")
        return None
    if parallel is None and model.backend not in sys.modules:
        return None
    return importlib.import_module(room).plan(model, parallel)


class Plan:
    """What ``fit`` asks of a parallel room (the base is one process, one device; rooms override). ``rank``,
    ``world`` and ``is_main`` describe this process; ``reduce`` sums a float vector over the ranks."""

    rank, world, is_main = 0, 1, True

    def reduce(self, values) -> np.ndarray:
        """``values`` (floats) summed over the ranks."""
        return np.asarray(values, np.float64)

    def agree(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank."""
        return bool(self.reduce([0.0 if flag else 1.0])[0] == 0)

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on some rank."""
        return bool(self.reduce([1.0 if flag else 0.0])[0] > 0)

    def seed(self, seed):
        """One shuffling seed for every rank (rank 0's when ``seed`` is None)."""
        return seed

    def wrap(self, step, model, loss, optimizer, compile, outputs):
        """The train step to use in place of the single-process ``step``."""
        return step

    def batches(self, data, batch_size, shuffle, rng, take):
        """This rank's batches of the epoch (see :func:`shard_batches`)."""
        agree = self.agree if self.world > 1 and not (isinstance(data, tuple) and len(data) == 2
                                                      and hasattr(data[0], "shape")) else None
        return shard_batches(data, batch_size, shuffle, rng, self.rank, self.world, take, agree)

    def end_epoch(self) -> None:
        """The epoch's batches are done (``fit`` calls it before validation and the epoch's callbacks): make
        the model whole and current if the step trained something else (FSDP2's shards)."""

    def n_batches(self, data, batch_size):
        """This rank's number of batches, where known."""
        if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
            return math.ceil(data[0].shape[0] / (batch_size * self.world))
        if isinstance(data, list | tuple):
            return len(data[self.rank::self.world])
        try:
            return len(data) if hasattr(data, "__len__") else None
        except TypeError:  # a tf.data.Dataset of unknown cardinality
            return None

    def evaluate(self, evaluate, model, loss, data, metrics, batch_size) -> dict:
        """``evaluate`` over this rank's part of ``data``, the means combined over the ranks by row count."""
        part, n = shard_rows(data, self.rank, self.world)
        counted = [0]
        if n is None:
            def counting(batches):
                for b in batches:
                    counted[0] += int(b[0].shape[0])
                    yield b
            part = list(counting(part))
        res = evaluate(model, loss, part, metrics=metrics, batch_size=batch_size)
        n = counted[0] if n is None else n
        keys = sorted(res)
        vec = self.reduce([n, *(res[k] * n for k in keys)])
        return {k: float(vec[i + 1] / max(vec[0], 1.0)) for i, k in enumerate(keys)}

    def check(self, model) -> None:
        """Raise if the ranks' models differ."""


# ----- data: one shared order, a disjoint part per rank -----------------------------------------------------
def shard_order(order: np.ndarray, batch_size: int, rank: int, world: int) -> Iterator[np.ndarray]:
    """The row indices of each of this rank's batches: step ``s`` takes the global batch
    ``order[s*B*W:(s+1)*B*W]`` (``B`` = ``batch_size``, ``W`` = ``world``) and rank ``r`` its ``r``-th part.
    A last, short global batch is split evenly (padded by repeating its first rows where it does not divide,
    as torch's ``DistributedSampler`` pads), so every rank runs the same number of steps, and the steps'
    mean gradient is the one of a single process with the global batch.

    >>> [b.tolist() for b in shard_order(np.arange(10), 2, 1, 2)]
    [[2, 3], [6, 7], [9]]
    >>> [b.tolist() for b in shard_order(np.arange(11), 2, 1, 2)]
    [[2, 3], [6, 7], [10, 8]]
    """
    g = batch_size * world
    for start in range(0, len(order), g):
        chunk = order[start:start + g]
        if len(chunk) < g:
            per = math.ceil(len(chunk) / world)
            chunk = np.concatenate([chunk, np.resize(chunk, per * world - len(chunk))])
        else:
            per = batch_size
        yield chunk[rank * per:(rank + 1) * per]


def shard_batches(data, batch_size: int, shuffle: bool, rng, rank: int, world: int, take: Callable,
                  agree: Callable | None = None):
    """This rank's ``(x, y)`` batches of ``data`` (the forms ``fit`` takes). ``(X, Y)`` arrays: cut by
    :func:`shard_order` from one order that every rank draws from the same seed. A list or tuple of
    batches: every ``world``-th batch from ``rank``. Any other iterable: used as given (shard it yourself,
    e.g. with a ``DistributedSampler``). ``agree(has_batch) -> bool``, where given, is asked before each
    batch whether every rank still has one, so that ranks with different batch counts stop together at the
    shortest instead of waiting forever for each other."""
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
        x, y = data
        n = x.shape[0]
        if y.shape[0] != n:
            raise ValueError(f"inputs have {n} rows but targets have {y.shape[0]}")
        order = rng.permutation(n) if shuffle else np.arange(n)
        for idx in shard_order(order, batch_size, rank, world):
            yield take(x, idx), take(y, idx)
        return
    it = iter(data[rank::world] if isinstance(data, list | tuple) else data)
    while True:
        batch = next(it, None)
        if agree is not None and not agree(batch is not None):
            return
        if batch is None:
            return
        yield batch


def shard_rows(data, rank: int, world: int):
    """This rank's part of ``data`` for evaluation (contiguous rows of ``(X, Y)`` arrays; every ``world``-th
    batch of a list or tuple; any other iterable as given) and a counter of the rows it yields."""
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
        n = data[0].shape[0]
        lo, hi = n * rank // world, n * (rank + 1) // world
        return (data[0][lo:hi], data[1][lo:hi]), hi - lo
    return (data[rank::world] if isinstance(data, list | tuple) else data), None


# ----- agreement ----------------------------------------------------------------------------------------
def describe_model(model) -> list:
    """``[(path, shape, dtype)]`` of every parameter and buffer: what ranks compare at the start."""
    out = [(k, tuple(p.shape), str(p.dtype)) for k, p in model.named_parameters()]
    out += [(k, tuple(b.shape), str(b.dtype)) for k, b in model.named_buffers()]
    return out


def first_difference(mine: list, theirs: list, me: int, other: int) -> str | None:
    """A sentence naming the first difference between two :func:`describe_model` lists, or None."""
    for a, b in zip(mine, theirs):
        if a != b:
            if a[0] != b[0]:
                return f"rank {me} has '{a[0]}' where rank {other} has '{b[0]}'"
            what = "shape" if a[1] != b[1] else "dtype"
            return (f"parameter '{a[0]}' has {what} {a[1] if what == 'shape' else a[2]} on rank {me} but "
                    f"{b[1] if what == 'shape' else b[2]} on rank {other}")
    if len(mine) != len(theirs):
        longer, n = (me, mine) if len(mine) > len(theirs) else (other, theirs)
        extra = n[min(len(mine), len(theirs))][0]
        return f"rank {longer} has '{extra}', which the other rank lacks ({len(mine)} vs {len(theirs)} entries)"
    return None


def check_same_model(model) -> None:
    """Raise :class:`DistributedError` naming the first difference if the ranks' models differ in paths,
    shapes or dtypes (nothing to check in one process)."""
    if world_size() == 1:
        return
    mine = describe_model(model)
    everyone = all_gather(mine)
    me = rank()
    for other, theirs in enumerate(everyone):
        diff = first_difference(mine, theirs, me, other)
        if diff is not None:
            raise DistributedError(f"the ranks' models differ: {diff}. Every rank must build the same model "
                                   "(same code, same input shape) before training")
