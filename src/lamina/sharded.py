"""Sharded checkpoints: each process writes its own safetensors shard, and one index file names them, the
``*.safetensors.index.json`` convention of Hugging Face::

    {"metadata": {"format": "lamina", "total_size": ..., "world_size": 2, ...},
     "weight_map": {"0.weight": "model-<tag>-00001-of-00002.safetensors", ...}}

Every key (parameter path, buffer path, and ``optimizer/<path>/<slot>`` with ``optimizer=``) is stored once,
whole, in one shard; the keys are spread over the processes by size, so each writes about ``1/world`` of
the bytes. Shards are written through ``lm.save`` (a temporary file renamed into place), under names that
are new for each save (``<tag>``), and the index is written last, by rank 0, the same way: a crash
mid-save leaves the previous index and the shards it names whole. Shards that no index names any more are
removed after the new index is in place.

Because every key is whole, a sharded checkpoint loads onto any number of processes or devices, and into
a single process: ``load_sharded(model, directory)``.

>>> import lamina as lm, tempfile  # doctest: +SKIP
>>> lm.distributed.save_sharded(model, "ckpt/")  # every rank calls it  # doctest: +SKIP
>>> lm.distributed.load_sharded(model, "ckpt/")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from . import process_group as distributed
from .checkpoint import load, save
from .errors import CheckpointError

__all__ = ["save_sharded", "load_sharded", "INDEX"]

INDEX = "model.safetensors.index.json"
_OPT = "optimizer/"


def _gathered_on_host(model, arrays: dict) -> dict:
    """Whole values on the host: a value sharded over devices or processes (an FSDP2 ``DTensor``, a jax
    array over several processes) is gathered by the process-group room of the model's backend."""
    from .backends import get_backend
    from .training import group_room

    b = get_backend(model.backend)
    room = group_room(model.backend)
    out = {}
    for k, v in arrays.items():
        if room is not None:
            v = room.full_value(v)
        out[k] = np.asarray(v) if isinstance(v, np.ndarray) else b.to_numpy(v)
    return out


def assign(sizes: dict, world: int) -> dict:
    """``{key: rank}``: the keys spread over ``world`` ranks by size (largest first, to the least loaded),
    the same on every rank."""
    load_of = [0] * world
    out = {}
    for k in sorted(sizes, key=lambda k: (-sizes[k], k)):
        r = min(range(world), key=lambda i: (load_of[i], i))
        out[k] = r
        load_of[r] += sizes[k]
    return out


def save_sharded(model, directory, *, optimizer=None, metadata: dict | None = None, prefix: str = "model") -> str:
    """Write ``model`` (and ``optimizer``'s state) as a sharded checkpoint in ``directory``; every process of a
    process group must call it. Returns the index file's path."""
    folder = Path(directory)
    rank, world = distributed.rank(), distributed.world_size()
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    tensors = _gathered_on_host(model, model.state_dict())
    if optimizer is not None:
        tensors.update({_OPT + k: v for k, v in _gathered_on_host(model, optimizer.state_dict()).items()})
    owner = assign({k: int(v.nbytes) for k, v in tensors.items()}, world)
    tag = distributed.broadcast(f"{time.time_ns():x}")
    names = [f"{prefix}-{tag}-{r + 1:05d}-of-{world:05d}.safetensors" for r in range(world)]
    distributed.barrier()  # the folder exists
    mine = {k: v for k, v in tensors.items() if owner[k] == rank}
    save(mine, folder / names[rank], durable=True)
    distributed.barrier()  # every shard is in place before the index names it
    index = folder / (INDEX if prefix == "model" else f"{prefix}.safetensors.index.json")
    if rank == 0:
        meta = {"format": "lamina", "world_size": world, "tag": tag,
                "total_size": int(sum(v.nbytes for v in tensors.values())), **(metadata or {})}
        if optimizer is not None:
            meta.update(optimizer=type(optimizer).__name__, optimizer_steps=int(optimizer.steps))
        text = json.dumps({"metadata": meta, "weight_map": {k: names[owner[k]] for k in tensors}}, indent=1)
        tmp = folder / f".{index.name}.lamina-tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, index)
        keep = set(names)
        for old in folder.glob(f"{prefix}-*-of-*.safetensors"):  # shards of earlier saves: no index names them
            if old.name not in keep:
                old.unlink(missing_ok=True)
    distributed.barrier()
    return str(index)


def _index_path(path) -> Path:
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.safetensors.index.json"))
        if len(found) != 1:
            raise CheckpointError(f"{p}: expected one *.safetensors.index.json in the folder, found "
                                  f"{[f.name for f in found]}; pass the index file itself")
        return found[0]
    return p


def read_sharded(path) -> tuple[dict, dict]:
    """``(tensors as NumPy arrays, metadata)`` of the sharded checkpoint at ``path`` (folder or index file)."""
    index = _index_path(path)
    try:
        spec = json.loads(index.read_text())
        weight_map = spec["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{index}: not a readable *.safetensors.index.json ({e}); expected "
                              '{"metadata": {...}, "weight_map": {key: shard file}}') from e
    files: dict = {}
    for k, f in weight_map.items():
        files.setdefault(f, []).append(k)
    out = {}
    for f, keys in files.items():
        shard = load(index.parent / f, backend="numpy")
        missing = [k for k in keys if k not in shard]
        if missing:
            raise CheckpointError(f"{index.parent / f}: the index says it holds {missing[:3]}, but it does not; "
                                  "the checkpoint is incomplete (was the save interrupted and the index edited?)")
        out.update({k: np.asarray(shard[k]) for k in keys})
    return out, spec.get("metadata", {})


def load_sharded(model, path, *, optimizer=None, strict: bool = True) -> None:
    """Load the sharded checkpoint at ``path`` (its folder or its index file) into ``model`` (and the optimizer
    state into ``optimizer``), whatever the number of processes or devices that wrote it."""
    tensors, meta = read_sharded(path)
    weights = {k: v for k, v in tensors.items() if not k.startswith(_OPT)}
    if optimizer is not None:
        state = {k[len(_OPT):]: v for k, v in tensors.items() if k.startswith(_OPT)}
        if not state:
            raise CheckpointError(f"{path}: load_sharded(optimizer=...) but the checkpoint has no optimizer state; "
                                  "save it with save_sharded(model, folder, optimizer=opt)")
        model.load_state_dict(weights, strict=strict)
        optimizer.load_state_dict(state, steps=int(meta.get("optimizer_steps", 0)))
        return
    model.load_state_dict(weights, strict=strict)
