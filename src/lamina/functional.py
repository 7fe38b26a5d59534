"""Run a module as a pure function of its parameters, and take gradients with the backend's autodiff.

``functional_call(model, params, *args)`` runs ``model`` with the arrays in ``params`` (a ``{path:
array}`` mapping, as from ``model.state_dict()``) in place of its own, and leaves the model as it was.
Nothing in it is global or cached, so it works under ``jax.jit``, ``jax.grad``, ``jax.vmap`` and
``torch.func``: those trace the model's ordinary Python code with their own arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import numpy as np

from . import context, tree
from .backends import backend_of, get_backend
from .errors import ParameterNotFoundError, ShapeError
from .module import _MISSING, Module
from .parameter import Parameter, _np_dtype

__all__ = ["functional_call", "value_and_grad"]


def _ready(model: Module, args, kwargs) -> None:
    """Build the model if a lazy layer has not seen an input yet (a dry run on ``args``) and draw any
    parameter not yet drawn, so that nothing changes the model while it runs on swapped values."""
    model.ensure_built(*args, **kwargs)


@contextmanager
def _swapped(model: Module, params: dict, carry: list | None = None):
    """Show ``params`` ({path: array}) to the model's modules for the duration; yields the dict in which
    buffer writes made by forward are recorded ({path: new value}). Everything is restored afterwards.

    Arrays that ``forward`` assigns to plain module attributes (``self.attention_weights = w``) while being
    traced are never left behind as tracers: the attribute gets its previous value back and, with ``carry``
    given, ``(module, name, traced value)`` is appended to it, so a caller can return the values from the
    traced function and set the concrete ones (``value_and_grad`` and the compiled jax step do)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"functional_call takes the parameters as a mapping {{path: array}} (as from "
                        f"model.state_dict()), got a {type(params).__name__}")
    idx = tree.index(model)
    unknown = [k for k in params if k not in idx.paths]
    if unknown:
        raise ParameterNotFoundError(f"{type(model).__name__} has no parameter {unknown}; its parameters and "
                                     f"buffers are {list(idx.paths)}")
    model_backend = get_backend(model.backend)
    params = {path: _checked(path, idx.paths[path], value, model_backend) for path, value in params.items()}
    shown = []
    frame = {"writes": {}, "written": {}, "paths": {id(p): path for path, p in idx.entries}}
    frames = context.pure_frames()
    frames.append(frame)
    try:
        for path, value in params.items():
            p = idx.paths[path]
            p.show(value)
            shown.append(p)
        yield frame["writes"]
    finally:
        frames.pop()
        for p in shown:
            p.show()
        for p in frame["written"].values():
            p.show()
        for m, name, before in frame.get("attrs", {}).values():  # never leave a tracer behind in a module
            value = m.__dict__.get(name)
            if model_backend.is_traced(value):
                if before is _MISSING:
                    m.__dict__.pop(name, None)
                else:
                    m.__dict__[name] = before
                if carry is not None:
                    carry.append((m, name, value))


def _checked(path: str, p: Parameter, value, backend):
    """``value`` for parameter ``p``: a Parameter gives its value; NumPy and other backends' arrays are converted
    to the model's backend in the parameter's dtype; a shape that does not fit is a ``ShapeError``. Arrays of
    the model's backend (tracers included) pass as they are."""
    if isinstance(value, Parameter):
        value = value.value
    if not backend.is_native(value):
        owner = backend_of(value)
        host = np.asarray(value if owner is None else owner.to_numpy(value))
        value = backend.from_numpy(host.astype(_np_dtype(p.dtype), copy=False), p._device)
    shape = tuple(value.shape)
    if p.is_built and shape != p.shape:
        raise ShapeError(p._owner_module(), f"functional_call: '{path}' has shape {p.shape} in the model but the "
                         f"value given for it has shape {shape}")
    return value


def functional_call(model: Module, params: dict, *args, return_buffers: bool = False, **kwargs):
    """``model(*args, **kwargs)`` computed with ``params`` (``{path: array}``) instead of the model's own
    values. Parameters missing from ``params`` keep their current values; an unknown path is an error.

    Buffers that forward updates (BatchNorm's running statistics in training mode) are not changed in the
    model: with ``return_buffers=True`` the call returns ``(outputs, {path: new buffer value})`` so that
    the caller can keep them, as a pure function should.

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); layer = lm.Linear(2, 1)
    <lamina backend 'numpy'>
    >>> w = {"weight": np.ones((2, 1), "float32"), "bias": np.zeros(1, "float32")}
    >>> lm.functional_call(layer, w, np.array([[1.0, 2.0]], "float32"))
    array([[3.]], dtype=float32)
    """
    _ready(model, args, kwargs)
    with _swapped(model, params) as writes:
        out = model(*args, **kwargs)
    return (out, dict(writes)) if return_buffers else out


def value_and_grad(fn, has_aux: bool = False):
    """Turn ``fn(model, *args) -> scalar loss`` into ``g(model, *args) -> (loss, {path: gradient})``.

    Gradients are taken with the backend's own autodiff (``torch.autograd``, ``jax.value_and_grad``)
    for every trainable parameter; a tied parameter appears once, under its first path, with the sum
    of the gradients of all its uses. Each gradient is also stored as the parameter's ``.grad``.
    With ``has_aux=True``, ``fn`` returns ``(loss, aux)`` and ``g`` returns ``((loss, aux), grads)``.
    The numpy backend has no autodiff and raises ``BackendError``.
    """

    def wrapped(model: Module, *args, **kwargs):
        if not model.is_built:  # build lazy layers by running fn itself once: only fn knows which
            with model.mode(False), get_backend(model.backend).no_grad():  # arguments go to the model
                fn(model, *args, **kwargs)
        model.ensure_built()
        backend = get_backend(model.backend)
        entries = [(path, p) for path, p in model.named_parameters() if p.trainable]
        params = {path: p.value for path, p in entries}

        carried: list = []

        def pure(ps):
            carried.clear()
            with _swapped(model, ps, carried) as writes:
                out = fn(model, *args, **kwargs)
            loss, aux = out if has_aux else (out, None)
            return loss, (aux, dict(writes), [v for _, _, v in carried])

        (loss, (aux, writes, attrs)), grads = backend.value_and_grad(pure, params, True)
        for (m, name, _), value in zip(carried, attrs):  # attributes forward set, with their concrete values
            m.__dict__[name] = backend.stop_gradient(value)
        grads = {path: grads[path] for path in params}  # model order (jax returns dict keys sorted)
        for path, p in entries:
            p.grad = grads.get(path)
        index = tree.index(model)
        for path, value in writes.items():  # buffer updates made by forward (running statistics)
            index.paths[path].value = backend.stop_gradient(value)
        return ((loss, aux) if has_aux else loss), grads

    return wrapped
