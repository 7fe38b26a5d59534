"""Randomness for layers (dropout): reproducible from ``lm.manual_seed`` and usable inside compiled steps.

A random layer asks ``next_key(backend)`` for each draw. Inside ``key_scope(key)`` (the jax train step
opens one per step, with a key passed in as data) the keys are derived from that key, so nothing random
is hidden in global state that ``jax.jit`` would freeze. Outside any scope they are fresh integer seeds
from a host stream that ``lm.manual_seed`` resets, so eager runs repeat exactly.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from . import context

__all__ = ["next_key", "key_scope", "next_seed", "next_seeds"]


def next_seed() -> int:
    """A fresh 31-bit seed from the host stream."""
    return int(context.host_rng().integers(0, 2**31 - 1))


def next_seeds(n: int) -> np.ndarray:
    """``n`` fresh seeds in one draw (uint32)."""
    return context.host_rng().integers(0, 2**31 - 1, size=n).astype(np.uint32)


def next_key(backend):
    """The key for one random draw: derived from the innermost ``key_scope``, else a host seed."""
    scopes = context.key_scopes()
    if scopes:
        scope = scopes[-1]
        scope[1] += 1
        return backend.fold_key(scope[0], scope[1])
    return next_seed()


@contextmanager
def key_scope(key):
    """Random layers called inside draw their keys from ``key`` (a backend key or an int seed). Yields a
    list whose second item counts the draws, so a tracer can tell whether the key was used at all."""
    scope = [key, 0]
    scopes = context.key_scopes()
    scopes.append(scope)
    try:
        yield scope
    finally:
        scopes.pop()
