"""All of Lamina's global state, in one place.

Everything else in the package is either a pure function or state held by an object the user owns
(a module, a parameter, an optimizer). What cannot be held that way lives here:

======================  ================  =========================================================
state                   scope             what it is for
======================  ================  =========================================================
``seed``, ``models``    process           ``lm.manual_seed``: the seed of new parameters and the
                                          count of models initialized since (``init.py`` reads it)
``host_rng``            process           the host stream of fresh seeds for random layers outside
                                          a compiled step (``random.py``)
``structure_version``   process           bumped by every change of any module tree's structure or
                                          of a trainable flag; traversal and train-step caches
                                          compare against it
``pure_frames``         thread            one frame per pure call in progress (``functional_call``,
                                          ``value_and_grad``, a compiled train step): buffer writes
                                          made by ``forward`` are recorded there
``key_scopes``          thread            the random key scopes opened by compiled steps
``value_owners``        process           which Parameter holds a given raw array as its value, so that
                                          ``lm.init.normal_(module.weight)`` finds the parameter
``interrupts``          thread            ``[depth, pending]``: inside ``fit`` (depth > 0) a Ctrl-C in
                                          the main thread is held back until the step's books agree
                                          (``interruption_point``); the SIGINT handler is Lamina's only
                                          while a ``fit`` runs in the main thread
======================  ================  =========================================================

Caches that belong to an object the user holds are not global state, but they are listed here so that
nothing hides: ``train._INFERENCE`` (a ``WeakKeyDictionary`` model -> (backend, snapshot of the modules'
plain attributes, compiled forward); one per model, rebuilt when the backend or a plain attribute changes);
``optimizer.step_cache`` (``{(id(model), backend, loss, compile, outputs): (weakref(model), step)}``, the
4 most recently used per optimizer, ``train.STEP_CACHE_SIZE``); each ``lm.value_and_grad`` function's
``runners`` (a ``WeakKeyDictionary`` model -> its compiled programs, on jax); the per-type dispatch caches of
``backends.backend_of`` and ``lm.ops`` (array type -> adapter or namespace; they never change meaning).

Thread-local state is what two threads could otherwise see half of: a pure call in one thread must not
record the buffer writes of a plain call in another, nor a compiled step in one thread draw its dropout
keys from a scope another thread opened. Process-wide state follows torch and numpy: one seed per process.
"""

from __future__ import annotations

import itertools
import secrets
import signal
import threading
import weakref

import numpy as np

__all__ = ["seed", "structure_version", "bump_structure", "pure_frames", "key_scopes"]

# ----- process-wide --------------------------------------------------------------------------------
_process = {
    "seed": secrets.randbits(63),  # like torch and numpy: without lm.manual_seed, runs differ
    "models": 0,
    "host_rng": np.random.default_rng(secrets.randbits(63)),
}
_versions = itertools.count(1)  # next() on a count is atomic under the GIL
_structure = [0]
_lock = threading.Lock()


def seed() -> int:
    """The current seed of new parameters (set by ``lm.manual_seed``)."""
    return _process["seed"]


def set_seed(value: int) -> None:
    """Set the seed, restart the model count and the host stream of random layers."""
    with _lock:
        _process["seed"] = int(value)
        _process["models"] = 0
        _process["host_rng"] = np.random.default_rng([int(value), 0x5EED])


def next_model_index() -> int:
    """A number for the next model whose parameters are drawn (so two identical models still differ)."""
    with _lock:
        _process["models"] += 1
        return _process["models"]


def host_rng() -> np.random.Generator:
    """The host stream of fresh seeds for random layers (reset by ``lm.manual_seed``)."""
    return _process["host_rng"]


def structure_version() -> int:
    """A number that changes whenever any module tree's structure (or a trainable flag) changes."""
    return _structure[0]


def bump_structure() -> None:
    """Record a change of structure: every traversal cache and compiled-step layout is stale now."""
    _structure[0] = next(_versions)


# id(array) -> the Parameter holding it; an entry goes away with its parameter (weak values)
_value_owners: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def note_value(old, new, param) -> None:
    """Record that ``param`` now holds the array ``new`` (instead of ``old``)."""
    if old is not None:
        _value_owners.pop(id(old), None)
    _value_owners[id(new)] = param


def parameter_of(array):
    """The Parameter whose current value is ``array``, or None (an id reused by another array is no match)."""
    p = _value_owners.get(id(array))
    return p if p is not None and p._value is array else None


# ----- per thread ----------------------------------------------------------------------------------
class _Local(threading.local):
    def __init__(self):
        self.pure_frames: list[dict] = []
        self.key_scopes: list[list] = []
        self.interrupts: list = [0, False]  # [depth of deferring regions, a Ctrl-C waits]


_local = _Local()


def pure_frames() -> list[dict]:
    """This thread's stack of pure-call frames (``{"writes", "written", "paths"}`` each)."""
    return _local.pure_frames


def key_scopes() -> list[list]:
    """This thread's stack of random key scopes (``[key, draws so far]`` each)."""
    return _local.key_scopes


# ----- Ctrl-C while training ---------------------------------------------------------------------------
def _on_sigint(signum, frame):
    """Lamina's SIGINT handler while ``fit`` runs: inside a deferring region the Ctrl-C waits for the next
    ``interruption_point``; a second one, or one outside, raises at once (as Python's own handler does)."""
    state = _local.interrupts  # (handlers run in the main thread: its state)
    if state[0] > 0 and not state[1]:
        state[1] = True
        return
    state[1] = False
    raise KeyboardInterrupt


class interrupts_deferred:
    """A region (``fit``) where a Ctrl-C waits until the books agree: Python raises a signal at any call or loop
    back-edge, and between a compiled step and the end of its bookkeeping (the model's new values published,
    the step counted twice: the engine's count, ``opt.steps``) that would leave a model half-updated, or holding
    arrays the step donated. Installs Lamina's handler only in the main thread and only over Python's default
    one (another handler is left alone, and then nothing is deferred); ``interruptible()`` opens it again
    around user code (callbacks), and a second Ctrl-C always raises at once."""

    def __enter__(self):
        self.installed = (threading.current_thread() is threading.main_thread()
                          and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        if self.installed:
            signal.signal(signal.SIGINT, _on_sigint)
        _local.interrupts[0] += 1
        return self

    def __exit__(self, kind, value, tb):
        state = _local.interrupts
        state[0] -= 1
        if self.installed and signal.getsignal(signal.SIGINT) is _on_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if state[0] == 0 and state[1]:
            state[1] = False
            if kind is None:  # (else the region already ends with an exception, a KeyboardInterrupt mostly)
                raise KeyboardInterrupt
        return False


class interruptible:
    """Inside an ``interrupts_deferred`` region: user code (a callback, validation), where a Ctrl-C raises at
    once; one that waits raises on entry."""

    def __enter__(self):
        interruption_point()
        state = _local.interrupts
        self.depth, state[0] = state[0], 0
        return self

    def __exit__(self, kind, value, tb):
        _local.interrupts[0] = self.depth
        return False


def interruption_point() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C that waited (called where the books agree)."""
    state = _local.interrupts
    if state[1]:
        state[1] = False
        raise KeyboardInterrupt
