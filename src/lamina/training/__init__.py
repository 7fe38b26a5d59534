"""Training, one room per backend behind one small interface (``training/base.py`` documents it).

``trainer_for(backend)`` gives the room of a backend adapter: the module that builds its train step
(``make_step``) and applies ``lm.optim`` updates eagerly (``engine``). A room is imported the first time
it is asked for, so ``import lamina`` imports no backend. A new backend that can train is one adapter in
``backends/``, one room here and one line in ``ROOMS``.
"""

from __future__ import annotations

import importlib
import sys

from ..errors import BackendError

__all__ = ["trainer_for", "ROOMS", "GROUPS", "active_group", "group_room"]

#: backend name -> the module of its training room
ROOMS = {"torch": "lamina.training.torch", "jax": "lamina.training.jax",
         "tensorflow": "lamina.training.tensorflow"}


def trainer_for(backend):
    """The training room of ``backend`` (an adapter from ``lm.get_backend``), imported on first use.

    >>> import lamina as lm
    >>> trainer_for(lm.get_backend("numpy"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lamina.errors.BackendError: the numpy backend cannot train (it has no automatic differentiation); ...
    """
    room = ROOMS.get(backend.name)
    if room is None:
        raise BackendError(f"the {backend.name} backend cannot train (it has no automatic differentiation); "
                           "train on torch or jax and load the weights here")
    return importlib.import_module(room)


#: backend name -> the module of its process-group room (``torch_dist.py`` documents the interface)
GROUPS = {"torch": "lamina.training.torch_dist", "jax": "lamina.training.jax_dist"}


def group_room(name: str):
    """The process-group room of the backend ``name`` (imported, and its backend with it), or None."""
    room = GROUPS.get(name)
    return None if room is None else importlib.import_module(room)


def active_group():
    """The process-group room whose group is up (a torch process group under ``torchrun``, several jax
    processes), or None. Never imports a backend: one that is not imported yet has no group up."""
    for name, room in GROUPS.items():
        if name in sys.modules:
            group = importlib.import_module(room)
            if group.is_active():
                return group
    return None
