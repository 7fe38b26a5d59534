"""Run a module as a pure function of its parameters, and take gradients with the backend's autodiff.

``functional_call(model, params, *args)`` runs ``model`` with the arrays in ``params`` (a ``{path:
array}`` mapping, as from ``model.state_dict()``) in place of its own, and leaves the model as it was.
Nothing in it is global or cached, so it works under ``jax.jit``, ``jax.grad``, ``jax.vmap`` and
``torch.func``: those trace the model's ordinary Python code with their own arrays.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from contextlib import contextmanager

import numpy as np

from . import context, random, tree
from .backends import backend_of, get_backend
from .errors import BackendError, ParameterNotFoundError, ShapeError
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
    # inside another pure call (functional_call within value_and_grad's fn) the modules show the outer call's
    # values, not the parameters' own: show every given value, and give the outer ones back afterwards
    nested = bool(frames)
    outer = [(m, m.__dict__.copy()) for _, m in idx.modules] if nested else None
    frames.append(frame)
    try:
        for path, value in params.items():
            p = idx.paths[path]
            if nested or value is not p._value:  # (at the top, its own value is shown already)
                p.show(value)
                shown.append(p)
        yield frame["writes"]
    finally:
        frames.pop()
        for p in shown:
            p.show()
        for p in frame["written"].values():
            p.show()
        if nested:
            for m, d in outer:
                for name in m._params:
                    if name in d:
                        m.__dict__[name] = d[name]
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
    if value is p._value:
        return value
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


def value_and_grad(fn, has_aux: bool = False, compile: bool | None = None):
    """Turn ``fn(model, *args) -> scalar loss`` into ``g(model, *args) -> (loss, {path: gradient})``.

    Gradients are taken with the backend's own autodiff (``torch.autograd``, ``jax.value_and_grad``)
    for every trainable parameter; a tied parameter appears once, under its first path, with the sum
    of the gradients of all its uses. Each gradient is also stored as the parameter's ``.grad``.
    With ``has_aux=True``, ``fn`` returns ``(loss, aux)`` and ``g`` returns ``((loss, aux), grads)``.
    Buffers that ``forward`` updates (BatchNorm's running statistics in training mode) and arrays it
    assigns to module attributes are stored in the model afterwards, as an eager call leaves them. A lazy
    model builds itself on the first call by running ``fn`` once in eval mode (only ``fn`` knows which
    arguments go to the model). The numpy backend has no autodiff and raises ``BackendError``.

    ``compile``: ``None`` (default) for the backend's choice: on jax, ``g`` is compiled, on torch and
    tensorflow it runs eagerly; ``False`` runs eagerly everywhere; ``True`` insists on compiling (a
    ``BackendError`` where the backend does not compile it). Compiled (``jax.jit``), ``g`` traces ``fn``
    once per signature: the shapes and dtypes of the array arguments (any container of them: tuples, lists,
    dicts), the values of the other arguments (ints, floats, strings, bools, None: static, hashed, so that a
    new value compiles again, like ``jax.jit``'s ``static_argnums``; an unhashable one is a ``TypeError``),
    the model's structure and trainable flags, each module's training mode and its plain Python attributes
    (``self.k = 5.0``); a ``RuntimeWarning`` says when one model has needed 20 programs (pass a number that
    changes on every call as an array, ``np.float32(beta)``). The current parameters, buffers and frozen
    values are passed in as arguments, so updates between calls are seen without compiling again. Inside
    ``fn`` the array arguments are tracers: ``fn`` must not read their values (``float(x.max())``,
    ``np.asarray(x)``, ``if x.sum() > 0:``); where it does, ``g`` raises a ``BackendError`` that says so
    (pass ``compile=False``). Other Python state that
    ``fn`` reads (a global, a closure) is frozen when it is traced, as under ``jax.jit``. Random layers
    (Dropout) draw from one fresh host seed per call (``lm.random.key_scope``, as ``fit``'s compiled step):
    reproducible under ``lm.manual_seed``, but not the same masks as an eager call. ``aux`` must hold
    arrays (and numbers, None) only. The compiled programs live as long as ``g`` and the model.

    A user's own loop (``opt`` an ``lm.optim`` optimizer)::

        grad = lm.value_and_grad(lambda m, xb, yb: lm.losses.mse(m(xb), yb))
        for xb, yb in batches:
            loss, grads = grad(model, xb, yb)
            opt.step(grads)
    """
    runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Compiled (run None: eager)

    def wrapped(model: Module, *args, **kwargs):
        backend = get_backend(model.backend)
        if compile is not False:
            runner = runners.get(model)
            if runner is None or runner.backend is not backend:
                runner = runners[model] = _Compiled(model, fn, has_aux, backend)
            if runner.run is not None:
                return runner(model, args, kwargs)
            if compile:
                raise BackendError(f"lm.value_and_grad(compile=True): the {backend.name} backend does not compile "
                                   "it (jax does); pass compile=None (the backend's choice) or False to run fn eagerly")
        _build(model, fn, args, kwargs)
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
        index = tree.index(model)
        for path, value in writes.items():  # buffer updates made by forward (running statistics)
            index.paths[path].value = backend.stop_gradient(value)
        return _publish(entries, grads, (loss, aux) if has_aux else loss)

    return wrapped


def _build(model: Module, fn, args, kwargs) -> None:
    """Build a lazy model by running ``fn`` itself once (only ``fn`` knows which arguments go to the model),
    in eval mode without gradients, and draw every parameter."""
    if not model.is_built:
        with model.mode(False), get_backend(model.backend).no_grad():
            fn(model, *args, **kwargs)
    model.ensure_built()


def _publish(entries, grads: dict, value):
    """``value_and_grad``'s result: the gradients in the model's order (jax returns dict keys sorted), each
    stored as its parameter's ``.grad``."""
    grads = {path: grads[path] for path, _ in entries}
    for path, p in entries:
        p.grad = grads[path]
    return value, grads


# ----- the compiled value_and_grad --------------------------------------------------------------------
_ARRAY = ("<array>",)  # marks an array argument in a signature (compared by equality: stable across calls)
_STATIC = ("<static>",)
_ZERO = np.uint32(0)
_MANY_TRACES = 20  # traces of one value_and_grad on one model before a warning
_PLAIN = frozenset((int, float, bool, str, type(None)))
_BOOKKEEPING: set = set()


class _Compiled:
    """``value_and_grad(fn)`` on one model, compiled by its backend (``Backend.jit``): one program per
    signature (see ``value_and_grad``), with the parameters, buffers and frozen values as arguments."""

    def __init__(self, model: Module, fn, has_aux: bool, backend):
        self.fn, self.has_aux, self.backend = fn, has_aux, backend
        self.model = weakref.ref(model)  # the runner is cached per model: it must not keep it alive
        self.run = backend.jit(self._pure, static_argnums=(0,))
        self.version = None  # the structure version the layout below was made for
        self.uses_keys = None  # None until a trace tells whether fn draws random numbers
        self.targets: dict = {}  # (id of module, name) -> (module, name): attributes forward assigns
        self.traces = 0

    def _layout(self, model: Module, args, kwargs) -> None:
        _build(model, self.fn, args, kwargs)
        index = tree.index(model)
        self.entries = [(k, p) for k, p in index.entries if not p._is_buffer and p.trainable]
        self.others = [(k, p) for k, p in index.entries if p._is_buffer or not p.trainable]
        self.modules = [m for _, m in index.modules]
        self.dicts = [m.__dict__ for m in self.modules]
        self.paths = index.paths
        self.version = context.structure_version()

    def __call__(self, model: Module, args: tuple, kwargs: dict):
        if self.version != context.structure_version():
            self._layout(model, args, kwargs)
        arrays: list = []
        spec = _spec((args, kwargs), arrays, self.backend, model, ())
        static = (spec, tuple(m.training for m in self.modules), _python_values(self.dicts))
        params = {k: p.value for k, p in self.entries}
        others = {k: p.value for k, p in self.others}
        # a host seed, only once a trace showed that fn draws random numbers (always a NumPy scalar: another
        # kind of argument would be another program)
        seed = _ZERO if self.uses_keys is False else np.uint32(random.next_seed())
        out = self._call(static, params, others, arrays, seed)
        if self.uses_keys is None:
            self.uses_keys = False  # traced, and no layer drew a key
        elif self.uses_keys and seed is _ZERO:  # traced just now, and it draws keys: it needs a seed
            out = self._call(static, params, others, arrays, np.uint32(random.next_seed()))
        loss, aux, grads, writes, attrs = out
        for path, value in writes.items():  # buffer updates made by forward (running statistics)
            self.paths[path].set_value(value, trusted=True)
        for key, value in attrs.items():  # attributes forward set, with their concrete values
            m, name = self.targets[key]
            m.__dict__[name] = value
        return _publish(self.entries, grads, (loss, aux) if self.has_aux else loss)

    def _call(self, *arguments):
        try:
            return self.run(*arguments)
        except Exception as e:
            if not self.backend.is_trace_error(e):
                raise
            raise BackendError(
                f"lm.value_and_grad compiles fn on the {self.backend.name} backend (one program per input "
                f"signature), and fn or the model's forward cannot be traced: it reads the value of a traced "
                f"array (float(), int(), .item(), np.asarray(), or a Python `if`/`while` on an array). Keep "
                f"it array code, or run fn eagerly with lm.value_and_grad(fn, compile=False) "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e

    def _pure(self, static, params, others, arrays, seed):
        """What the backend compiles: the loss, aux, gradients, buffer writes and assigned attributes."""
        model, backend = self.model(), self.backend
        args, kwargs = _rebuild(static[0], iter(arrays))
        self.traces += 1
        if self.traces == _MANY_TRACES:
            warnings.warn(f"lm.value_and_grad has compiled fn {_MANY_TRACES} times for this {type(model).__name__}: "
                          "each new input shape, Python argument value (a float too), module mode or plain "
                          "attribute value compiles it again. Pass numbers that change as arrays "
                          "(np.float32(x)), or run fn eagerly with lm.value_and_grad(fn, compile=False)",
                          RuntimeWarning, stacklevel=2)
        carried: list = []

        def f(ps):
            carried.clear()
            with random.key_scope(seed) as scope:
                with _swapped(model, {**others, **ps}, carried) as writes:
                    out = self.fn(model, *args, **kwargs)
                writes = dict(writes)
            if scope[1]:  # this trace drew random numbers: each call needs a fresh seed
                self.uses_keys = True
            loss, aux = out if self.has_aux else (out, None)
            _check_aux(aux, backend, ())
            attrs = {}
            for m, name, value in carried:
                self.targets[(id(m), name)] = (m, name)
                attrs[(id(m), name)] = value
            return loss, (aux, writes, attrs)

        (loss, (aux, writes, attrs)), grads = backend.value_and_grad(f, params, True)
        stop = backend.stop_gradient
        return (loss, aux, grads, {k: stop(v) for k, v in writes.items()}, {k: stop(v) for k, v in attrs.items()})


def _spec(x, arrays: list, backend, model: Module, where: tuple):
    """The hashable signature of the arguments ``x``: arrays (of the model's backend, NumPy's, and other
    backends', converted as the model would) are appended to ``arrays`` and marked ``_ARRAY``; tuples,
    lists and dicts are followed; any other value is kept as it is (static, so it must be hashable)."""
    t = type(x)
    if t is tuple or t is list:
        return (t, tuple(_spec(e, arrays, backend, model, (*where, i)) for i, e in enumerate(x)))
    if t is dict:
        return (t, tuple((k, _spec(v, arrays, backend, model, (*where, k))) for k, v in x.items()))
    if backend.is_native(x) or (isinstance(x, np.ndarray | np.generic) and x.dtype.kind in "biufc"):
        arrays.append(x)
        return _ARRAY
    if isinstance(x, tuple) and hasattr(t, "_fields"):  # a named tuple
        return (t, tuple(_spec(e, arrays, backend, model, (*where, i)) for i, e in enumerate(x)))
    if backend_of(x) is not None:  # another backend's array: the model's own error (or conversion)
        arrays.append(model.convert_inputs(x)[0])
        return _ARRAY
    try:
        hash(x)
    except TypeError:
        name = ("args" if where[0] == 0 else "kwargs") + "".join(f"[{k!r}]" for k in where[1:])
        raise TypeError(
            f"lm.value_and_grad compiles fn on the {backend.name} backend, where an argument that is not an "
            f"array is static (hashed into the program's signature), but {name} is an unhashable "
            f"{t.__name__}; pass arrays, tuples, lists or dicts of them and hashable values, or run fn eagerly "
            f"with lm.value_and_grad(fn, compile=False)") from None
    return (_STATIC, t, x)


def _rebuild(spec, arrays):
    """The arguments ``_spec`` described, with the next item of the iterator ``arrays`` for each array."""
    if spec is _ARRAY or spec == _ARRAY:
        return next(arrays)
    kind, items = spec[0], spec[1]
    if kind is _STATIC or kind == _STATIC:
        return spec[2]
    if kind is dict:
        return {k: _rebuild(v, arrays) for k, v in items}
    if kind is tuple or kind is list:
        return kind(_rebuild(e, arrays) for e in items)
    return kind(*(_rebuild(e, arrays) for e in items))  # a named tuple


def _check_aux(aux, backend, where: tuple) -> None:
    """A compiled function returns arrays only: say which part of ``aux`` is not one."""
    if isinstance(aux, tuple | list):
        for i, v in enumerate(aux):
            _check_aux(v, backend, (*where, i))
    elif isinstance(aux, dict):
        for k, v in aux.items():
            _check_aux(v, backend, (*where, k))
    elif not (aux is None or backend.is_native(aux) or isinstance(aux, int | float | np.ndarray | np.generic)):
        name = "aux" + "".join(f"[{k!r}]" for k in where)
        raise TypeError(f"lm.value_and_grad compiles fn on the {backend.name} backend, where fn can return only "
                        f"arrays, but {name} is a {type(aux).__name__}; return it another way, or run fn eagerly "
                        "with lm.value_and_grad(fn, compile=False)")


def _python_values(dicts: list) -> tuple:
    """Every module's plain Python attributes (numbers, strings, tuples of them; ``Module``'s own bookkeeping
    left out): ``forward`` reads them while it is traced, so a change (``m.k = 5.0``) must trace again."""
    skip = _BOOKKEEPING or _bookkeeping()
    return tuple([(i, name, v) for i, d in enumerate(dicts) for name, v in d.items() if name not in skip
                  and (type(v) in _PLAIN or type(v) is tuple and all(type(e) in _PLAIN for e in v))])


def _bookkeeping() -> set:
    """The attributes ``Module`` keeps for itself (built flags, mode, caches): not the user's values."""
    _BOOKKEEPING.update(Module().__dict__, ("training", "_built", "_building", "_pass", "_model_index"))
    return _BOOKKEEPING
