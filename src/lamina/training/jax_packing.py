"""A small model's values as one vector per dtype while ``fit`` runs its epoch on jax (``training/jax.py``).

Each array a compiled call takes costs the host ~0.5 us of dispatch, and each array it returns ~1 us. A
small model's step is mostly that: issue 13's tiny model (Linear(64,8)+ReLU -> Linear(8,1), Adam) hands 12
arrays in and out of every step (4 parameters, 8 moments). Packed, the step takes and returns one vector,
slices the arrays out of it (exact: slices and reshapes), and concatenates the new values into a new one.

The arithmetic is the unpacked step's; XLA may fuse the packed program differently, so a custom update rule
can differ in the last bit (Adam, AdamW, SGD with momentum: the same bits in tests/test_jax_packing.py).

Measured (a hand-written jax step, 2 cores): 20.8 -> 11.8 us per step for the tiny model, 28.3 -> 24.0 us
with 66 KB of parameters and moments, even at 100 KB, and slower from there (the slices and the
concatenation are copies inside the step: 77 -> 89 us at 300 KB). So only values up to PACK_BELOW_BYTES
are packed, all on one device. Only steps run one per call are packed: inside a grouped call (a ``lax.scan``
over 16 steps) XLA runs the unpacked carry faster, even with the slicing and the concatenation outside the
loop (the tiny model: 6.5 unpacked against 8.9 us per step packed).

The vectors are new buffers, made in one compiled call from the model's values: those are never donated,
so nothing a user holds is invalidated, and no protective copy is needed. ``unpack_call`` makes the
arrays that ``fit`` publishes at the end of the epoch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PACK_BELOW_BYTES", "Packing", "Unpackable", "packing_for", "true_on", "copied"]

PACK_BELOW_BYTES = 64 << 10


class Unpackable(Exception):
    """Raised while a packed step is traced when its new values do not fit the vectors of its inputs (an
    optimizer whose state changes its slots or shapes, a step that changes a value's dtype): nothing has run
    or been donated yet, and the epoch goes on unpacked."""


class Packing:
    """Where each leaf of a pytree of arrays (shapes and dtypes ``specs``) lives: vector ``group`` (one per
    dtype, in order of first appearance), elements ``start:stop``."""

    def __init__(self, treedef, specs: tuple):
        self.treedef, self.specs = treedef, specs
        self.dtypes: list = []
        self.where: list = []  # per leaf: (group, start, stop, shape)
        sizes: list = []
        for shape, dtype in specs:
            if dtype not in self.dtypes:
                self.dtypes.append(dtype)
                sizes.append(0)
            g = self.dtypes.index(dtype)
            n = math.prod(shape)
            self.where.append((g, sizes[g], sizes[g] + n, shape))
            sizes[g] += n
        self.pack_call = jax.jit(self._pack_call)
        self.unpack_call = jax.jit(self.unpack)

    def pack(self, tree) -> tuple:
        """The vectors of ``tree`` (inside a traced function), which must have the structure, shapes and dtypes
        this packing was made for (else ``Unpackable``)."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        got = tuple((a.shape, np.dtype(a.dtype)) for a in leaves)
        if treedef != self.treedef or got != self.specs:
            raise Unpackable(f"a packed step's new values differ from its inputs in structure, shape or dtype: "
                             f"{[g for g, want in zip(got, self.specs) if g != want] or treedef}")
        groups: list = [[] for _ in self.dtypes]
        for (g, _, _, _), a in zip(self.where, leaves):
            groups[g].append(jnp.ravel(a))
        return tuple(jnp.concatenate(parts) for parts in groups)

    def unpack(self, vectors: tuple):
        """The tree of the vectors (slices, reshaped)."""
        leaves = [vectors[g][start:stop].reshape(shape) for g, start, stop, shape in self.where]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def _pack_call(self, tree, keep, host):
        """``(vectors of tree, a copy of host)`` in one call; ``keep`` (a True committed to the device) puts the
        NumPy array ``host`` there (an output that is an input as it is would come back uncommitted)."""
        return self.pack(tree), None if host is None else copied(host, keep)


def packing_for(tree, known: dict) -> Packing | None:
    """The ``Packing`` of ``tree`` (kept in ``known`` by its structure, shapes and dtypes, so that its compiled
    calls are made once), or None where it is not worth it: above PACK_BELOW_BYTES, no arrays, arrays that
    do not all live on one same device, or a layout whose step turned out ``Unpackable`` (``known`` holds
    None for it: see ``unpackable``)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves or sum(a.nbytes for a in leaves) > PACK_BELOW_BYTES:
        return None
    devices = leaves[0].devices()
    if len(devices) != 1 or any(a.devices() != devices for a in leaves):
        return None
    key = (treedef, tuple((a.shape, np.dtype(a.dtype)) for a in leaves))
    if key not in known:
        known[key] = Packing(treedef, key[1])
    return known[key]


def unpackable(pk: Packing, known: dict) -> None:
    """Never pack ``pk``'s layout again (its step is ``Unpackable``)."""
    known[(pk.treedef, pk.specs)] = None


_TRUE: dict = {}  # device -> True, committed to it


def true_on(device):
    """``True`` as an array committed to ``device`` (made once), or a NumPy True for None: an argument that
    puts a compiled call's NumPy inputs and its outputs on that device."""
    if device is None:
        return np.bool_(True)
    if device not in _TRUE:
        _TRUE[device] = jax.device_put(np.bool_(True), device)
    return _TRUE[device]


def copied(a, keep):
    """Inside a compiled call: a copy of ``a`` in a new buffer, on the device of ``keep`` (``true_on``'s True). A
    select on a traced True is one fused kernel (XLA runs ``jnp.copy`` as a copy per array: 28 against 65 us for
    the tiny model's 13 arrays) and keeps the bits, NaNs and signed zeros alike; an output that is an input as
    it is would come back uncommitted, without ``keep``'s device."""
    if jnp.issubdtype(a.dtype, jnp.number) or a.dtype == jnp.bool_:
        return jnp.where(keep, a, jnp.zeros_like(a))
    return jnp.copy(a)
