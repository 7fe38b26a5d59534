"""Module: the base class of every layer and model.

A subclass assigns parameters (``lm.Parameter``), buffers (``lm.Buffer``) and child modules as attributes
in ``__init__`` (children may sit in lists, tuples and dicts too) and writes ``forward``. Optionally it
writes ``build(self, input_shape)``, which runs once, before the first ``forward``, to create parameters
whose shapes depend on the input.

The call path is kept short on purpose (DESIGN.md, rule 4): a parameter's raw array sits in the owning
module's ``__dict__``, so ``self.weight`` inside ``forward`` is a plain attribute read; input checks cost
one set lookup per positional argument; everything that explains a failure (layer paths, shapes,
devices) runs only after something has failed.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
import warnings
import weakref
from collections.abc import Mapping

import numpy as np

from . import build as _build
from . import context
from . import init as _init
from .backends import backend_of, get_backend
from .errors import BackendError, DeviceError, ModuleError, ParameterNotFoundError
from .explain import reraise as _reraise
from .parameter import Parameter, _fmt_shape
from .statedict import apply_load, plan_load
from .summary import summary as _summary
from .torch_weights import convert_torch_state, is_torch_state_dict
from .tree import index as _tree_index
from .tree import root_of

__all__ = ["Module", "ModuleList", "ModuleDict"]

_NO_INPUT = object()  # marks "called with no positional input"
_MISSING = object()  # marks "the attribute did not exist"



class _ParamSlot:
    """Class attribute standing in for a parameter whose value is not in the instance ``__dict__`` yet.

    Reading ``module.weight`` normally finds the raw array in the instance ``__dict__``. Only when it is
    not there (values not drawn yet, or a parameter whose shape is still unknown) does Python fall back
    to this descriptor, which draws the values or explains why it cannot. This replaces a ``__getattr__``
    hook, whose mere presence doubles the cost of every attribute read in ``forward`` (measured: 70 ns
    against 34 ns for two reads on CPython 3.11), because it keeps CPython from specializing them.
    """

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        p = (obj.__dict__.get("_params") or {}).get(self.name)
        if p is None:
            raise AttributeError(f"{type(obj).__name__!r} object has no attribute {self.name!r}")
        return p.value


class Module:
    """Base class of layers and models. Subclass it, assign parameters and children in ``__init__``
    (after ``super().__init__()``), and write ``forward``.

    Example:
        >>> import lamina as lm, numpy as np
        >>> class CenteredLayer(lm.Module):
        ...     def forward(self, X):
        ...         return X - X.mean()
        >>> lm.set_backend("numpy"); CenteredLayer()(np.array([1.0, 2, 3, 4, 5]))
        <lamina backend 'numpy'>
        array([-2., -1.,  0.,  1.,  2.])
    """

    # A subclass's build(self, input_shape) is stored here and ``build`` becomes the public method.
    _build_hook = None
    _build_hook_arity = 1
    _pass = None  # until the first call (and for a module whose __init__ forgot super().__init__())

    def __init__(self):
        d = self.__dict__
        d["_params"] = {}
        d["_modules"] = {}
        d["_parents"] = []  # (weakref to parent, name under which the parent holds self)
        d["_backend"] = get_backend()
        d["_device"] = None  # None: the backend's default device
        d["_built"] = False
        d["_building"] = None
        d["_pass"] = None  # set of types that go straight to forward; None until the first call
        d["_cache"] = None
        d["training"] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A forward of exactly one input gets a call path without *args/**kwargs packing (~60 ns a call).
        forward = cls.__dict__.get("forward")
        if forward is not None and cls.__call__ in (Module.__call__, Module._call_one):  # never a user's own
            params = list(inspect.signature(forward).parameters.values())[1:]
            one = len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY,
                                                          params[0].POSITIONAL_OR_KEYWORD)
            cls.__call__ = Module._call_one if one else Module.__call__
        hook = cls.__dict__.get("build")
        if hook is not None and hook is not Module.build:
            cls._build_hook = hook
            params = list(inspect.signature(hook).parameters.values())[1:]
            cls._build_hook_arity = (1 << 30) if any(p.kind is p.VAR_POSITIONAL for p in params) else len(params)
            cls.build = Module.build

    def forward(self, *args, **kwargs):
        """The layer's computation. Subclasses must override it."""
        raise NotImplementedError(f"{type(self).__name__} must define forward(self, ...)")

    # ----- calling -----------------------------------------------------------------------------------
    def __call__(self, x=_NO_INPUT, /, *args, **kwargs):
        # Fast path: one positional input of a type already known to need no conversion. Spelling out
        # the first argument saves ~110 ns per call over re-packing *args (measured on CPython 3.11).
        passthrough = self._pass
        if passthrough is not None and type(x) in passthrough and not args and not kwargs:
            try:
                return self.forward(x)
            except Exception as e:
                _reraise(self, e, (x,))
        args = args if x is _NO_INPUT else (x, *args)
        if passthrough is None:
            return self._first_call(args, kwargs)
        for a in args:
            if type(a) not in passthrough:
                args = self._convert_inputs(args)
                break
        try:
            return self.forward(*args, **kwargs)
        except Exception as e:
            _reraise(self, e, args)

    def _call_one(self, x):
        """``__call__`` for layers whose ``forward`` takes exactly one input (chosen per class)."""
        passthrough = self._pass
        if passthrough is not None and type(x) in passthrough:
            try:
                return self.forward(x)
            except Exception as e:
                _reraise(self, e, (x,))
        return Module.__call__(self, x)

    def _first_call(self, args, kwargs):
        if "_params" not in self.__dict__:
            raise ModuleError(f"{type(self).__name__} was not initialized: its __init__ must call "
                              "super().__init__() first")
        try:
            args = self._convert_inputs(args)
            if not self._built:
                self._run_build([tuple(a.shape) for a in args if hasattr(a, "shape")])
            self._draw_parameters()
        except Exception as e:
            _reraise(self, e, args, diagnose=False)
        self.__dict__["_pass"] = self._backend.native_types
        try:
            return self.forward(*args, **kwargs)
        except Exception as e:
            _reraise(self, e, args)

    def _convert_inputs(self, args) -> tuple:
        """Native arrays pass; NumPy arrays and lists of numbers become arrays of this module's backend
        (floating ones as float32); other lists, tuples and dicts are containers whose arrays are converted
        (a decoder's ``[enc_outputs, valid_lens, [None] * n]`` stays a list); an array of another framework
        is an error naming both."""
        b = self._backend
        out = []
        for a in args:
            t = type(a)
            if t in b.native_types:
                out.append(a)
            elif b.is_native(a):
                b.native_types.add(t)  # a tracer or subclass: remember it for the fast path
                out.append(a)
            else:
                out.append(self._convert_one(a))
        return tuple(out)

    def _convert_one(self, a):
        b = self._backend
        if isinstance(a, list | tuple | dict):
            if isinstance(a, list) and _numbers_only(a):
                return self._convert_one(np.asarray(a))
            items = a.items() if isinstance(a, dict) else enumerate(a)
            new = {k: v if type(v) in b.native_types else self._convert_one(v) for k, v in items}
            return new if isinstance(a, dict) else type(a)(new.values()) if type(a) in (list, tuple) else a
        if isinstance(a, np.ndarray | np.generic):
            if a.dtype.kind not in "biufc":
                return a
            if a.dtype == np.float64:
                a = a.astype(np.float32)
            return b.from_numpy(np.asarray(a), self._device)
        if b.is_native(a):
            return a
        if (other := backend_of(a)) is not None:
            raise BackendError(
                f"{type(self).__name__} lives on the {b.name} backend but got a {other.array_name}; "
                f"pass a {b.array_name} (or a NumPy array), or move the model with "
                f"model.to(backend={other.name!r})")
        return a

    def convert_inputs(self, *args) -> tuple:
        """The inputs as ``forward`` would receive them: arrays of this module's backend pass; NumPy arrays
        and lists of numbers become arrays of its backend on its device (float64 as float32); other values
        (None, ints, containers) pass unchanged; an array of another backend is a ``BackendError``."""
        return self._convert_inputs(args)

    def diagnose(self, args) -> Exception | None:
        """After a failure: a clearer error for it, or None. Layers extend it with shape checks."""
        dev = self.device
        for a in args:
            b = backend_of(a)
            if b is self._backend:
                d = b.device_of(a)
                if d != dev:
                    return DeviceError(f"{type(self).__name__} has its parameters on device {dev!r} but got "
                                       f"an input on device {d!r}; move the input to {dev!r}, or the model "
                                       f"to the input's device with model.to(device={d!r})")
        return None

    # ----- building ----------------------------------------------------------------------------------
    def build(self, *input_shapes):
        """Build the model for inputs of these shapes (``None`` for an unknown batch axis), as the first
        call would, and draw its parameters. Returns the module.

        Layers write their own ``build(self, input_shape)`` hook; calling ``model.build(...)`` runs it
        and, if children are still unbuilt, a dry run on zeros in eval mode without gradients.

        >>> import lamina as lm
        >>> lm.set_backend("numpy"); net = lm.Sequential(lm.Linear(4)).build((None, 3))
        <lamina backend 'numpy'>
        >>> net[0].get_parameter("weight").shape
        (3, 4)
        """
        running = self.__dict__.get("_building")
        if running is not None:  # super().build(...) from inside a subclass's hook
            return _build.run_hook_after(self, running, input_shapes)
        if not input_shapes:
            raise TypeError("build() needs the input shape, e.g. model.build((None, 20))")
        shapes = [tuple(s) for s in input_shapes]
        if not self._built:
            self._run_build(shapes)
        if self._needs_build():
            self.dry_run(*[np.zeros([1 if s is None else s for s in shape], np.float32) for shape in shapes])
        self._draw_parameters()
        return self

    @property
    def is_built(self) -> bool:
        """True once this module and every descendant know all their parameter shapes."""
        return not self._needs_build()

    def ensure_built(self, *args, **kwargs) -> Module:
        """Build every lazy layer, if any is unbuilt, with a dry run on these example inputs (see
        ``dry_run``), and draw every parameter's values. Returns the module. Training and pure calls use
        it so that nothing changes the model while it runs on swapped values."""
        if self._needs_build():
            self.dry_run(*args, **kwargs)
        self._draw_parameters()
        return self

    def _needs_build(self) -> bool:
        idx = self._index()
        if idx.built:
            return False
        needs = (any(not m._built and m._build_hook is not None for _, m in idx.modules)
                 or any(not p.is_built for _, p in idx.entries))
        idx.built = not needs
        return needs

    def dry_run(self, *args, **kwargs):
        """Call the model once on example inputs in eval mode without gradients (so every lazy layer builds
        itself), leaving each module's mode as it was. Returns the outputs."""
        with self.mode(False), self._backend.no_grad():
            return self(*args, **kwargs)

    @contextlib.contextmanager
    def mode(self, training: bool):
        """A block in which the whole tree is in training (``True``) or eval (``False``) mode; afterwards
        each module has its own mode back.

        >>> import lamina as lm
        >>> lm.set_backend("numpy"); net = lm.Sequential(lm.Dropout(0.5))
        <lamina backend 'numpy'>
        >>> with net.mode(False):
        ...     net[0].training
        False
        >>> net[0].training
        True
        """
        modes = [(m, m.training) for m in self.modules()]
        self.train(training)
        try:
            yield self
        finally:
            for m, was in modes:
                m.__dict__["training"] = was


    def _run_build(self, shapes: list) -> None:
        _build.run_build(self, shapes)

    def _draw_parameters(self, only: Parameter | None = None) -> None:
        _build.draw_parameters(self, only)

    def _root(self) -> Module:
        return root_of(self)

    # ----- registration ------------------------------------------------------------------------------
    def __setattr__(self, name: str, value) -> None:
        d = self.__dict__
        params = d.get("_params")
        if params is None:
            if isinstance(value, Module | Parameter) or _holds_modules(value):
                raise ModuleError(f"{type(self).__name__}.__init__ must call super().__init__() before "
                                  f"assigning parameters or layers (while setting '{name}')")
            object.__setattr__(self, name, value)
            return
        if isinstance(value, Parameter):
            self._unregister(name)
            self._register_parameter(name, value)
        elif isinstance(value, Module):
            self._unregister(name)
            self._register_module(name, value)
        elif name in params and value is not None:
            if value is not d.get(name):
                if context.pure_frames():
                    self._record_write(params[name], name, value)
                else:
                    params[name]._assign(value)
        elif _holds_modules(value):
            self._unregister(name)
            self._register_module(name, ModuleDict(value) if isinstance(value, dict) else ModuleList(value))
        else:
            self._unregister(name)
            frames = context.pure_frames()
            if frames and self._backend.is_traced(value):  # the textbook's self.attention_weights = ...
                attrs = frames[-1].setdefault("attrs", {})
                attrs.setdefault((id(self), name), (self, name, d.get(name, _MISSING)))
            d[name] = value

    def add_module(self, name: str, module: Module | None) -> None:
        """Register ``module`` as a child under ``name`` (as ``self.<name> = module``), as in torch."""
        self._check_name(name)
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module('{name}', ...) takes an lm.Module, got {type(module).__name__}")
        setattr(self, name, module)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Register ``param`` under ``name`` (as ``self.<name> = param``), as in torch."""
        self._check_name(name)
        if param is not None and (not isinstance(param, Parameter) or param.is_buffer):
            raise TypeError(f"register_parameter('{name}', ...) takes an lm.Parameter, got {type(param).__name__}")
        setattr(self, name, param)

    def register_buffer(self, name: str, value, persistent: bool = True) -> None:
        """Register a buffer under ``name``: ``value`` is an array (of any backend, or NumPy) or an
        ``lm.Buffer``; ``persistent=False`` keeps it out of checkpoints. As in torch."""
        from .parameter import Buffer

        self._check_name(name)
        if value is None:  # as torch: the attribute is None and nothing is saved
            setattr(self, name, None)
            return
        buf = value if isinstance(value, Buffer) else Buffer(value, persistent=persistent)
        if not persistent:
            buf.persistent = False
        setattr(self, name, buf)

    def _check_name(self, name) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{type(self).__name__}: a child or parameter name is a non-empty string without "
                             f"'.', got {name!r}")
        if "_params" not in self.__dict__:
            raise ModuleError(f"{type(self).__name__}.__init__ must call super().__init__() before registering "
                              f"'{name}'")
        if name not in self._params and name not in self._modules and (
                hasattr(type(self), name) and not isinstance(getattr(type(self), name), _ParamSlot)
                or name in self.__dict__):
            raise KeyError(f"{type(self).__name__}: cannot register '{name}': {type(self).__name__}.{name} already "
                           "exists (a method or an attribute of the module); choose another name (torch refuses it "
                           "too)")

    def _record_write(self, p: Parameter, name: str, value) -> None:
        frame = context.pure_frames()[-1]
        path = frame["paths"].get(id(p))
        if not p._is_buffer or path is None:
            raise ModuleError(f"{type(self).__name__}.forward assigned {'parameter' if not p._is_buffer else 'buffer'}"
                              f" '{name}' during a pure call (functional_call, value_and_grad, a compiled step); "
                              "only buffers of the model being called may be updated there")
        frame["writes"][path] = value
        frame["written"][id(p)] = p
        p.show(value)  # later reads in this call see the new value

    def __delattr__(self, name: str) -> None:
        if name in self._params or name in self._modules:
            self._unregister(name)
        else:
            object.__delattr__(self, name)

    def _register_parameter(self, name: str, p: Parameter) -> None:
        if p._backend is None:
            p._backend, p._device = self._backend, self._device
        elif p._backend is not self._backend:
            raise BackendError(f"parameter '{p.name}' lives on the {p._backend.name} backend and cannot be "
                               f"shared with {type(self).__name__} on the {self._backend.name} backend")
        if not p.name:
            p.name = name
        cls = type(self)
        if not isinstance(getattr(cls, name, None), _ParamSlot) and not hasattr(cls, name):
            setattr(cls, name, _ParamSlot(name))
        p._owners.append((weakref.ref(self), name))
        self._params[name] = p
        p.show()
        self.__dict__["_built"] = self.__dict__["_built"] and p.is_built
        context.bump_structure()

    def _register_module(self, name: str, child: Module) -> None:
        if "_params" not in child.__dict__:
            raise ModuleError(f"{type(child).__name__}.__init__ must call super().__init__()")
        if child._backend is not self._backend:
            raise BackendError(
                f"cannot add {type(child).__name__} (on the {child._backend.name} backend) to "
                f"{type(self).__name__} (on the {self._backend.name} backend); move it first with "
                f".to(backend={self._backend.name!r})")
        child._parents.append((weakref.ref(self), name))
        self._modules[name] = child
        self.__dict__[name] = child
        context.bump_structure()

    def _unregister(self, name: str) -> None:
        d = self.__dict__
        p = d["_params"].pop(name, None)
        if p is not None:
            p._owners[:] = [(r, n) for r, n in p._owners if not (r() is self and n == name)]
        c = d["_modules"].pop(name, None)
        if c is not None:
            c._parents[:] = [(r, n) for r, n in c._parents if not (r() is self and n == name)]
        if p is not None or c is not None:
            d.pop(name, None)
            context.bump_structure()

    # ----- traversal ---------------------------------------------------------------------------------
    def _index(self):
        return _tree_index(self)

    def named_parameters(self):
        """``(dotted path, Parameter)`` pairs of every parameter in the tree, each shared one once."""
        return iter([(k, p) for k, p in self._index().entries if not p._is_buffer])

    def parameters(self):
        """Every ``Parameter`` in the tree, each shared one once."""
        return iter([p for _, p in self._index().entries if not p._is_buffer])

    def named_buffers(self):
        """``(dotted path, Buffer)`` pairs of every buffer in the tree."""
        return iter([(k, p) for k, p in self._index().entries if p._is_buffer])

    def buffers(self):
        """Every ``Buffer`` in the tree, each shared one once."""
        return iter([p for _, p in self._index().entries if p._is_buffer])

    def named_modules(self):
        """``(dotted path, Module)`` pairs of this module (path ``""``) and every descendant, each once."""
        return iter(list(self._index().modules))

    def modules(self):
        """This module and every descendant, each once (pre-order)."""
        return iter([m for _, m in self._index().modules])

    def named_children(self):
        """``(name, Module)`` of the direct children, each shared one once."""
        seen: set[int] = set()
        out = []
        for name, m in self._modules.items():
            if id(m) not in seen:
                seen.add(id(m))
                out.append((name, m))
        return iter(out)

    def children(self):
        """The direct children, each shared one once."""
        return iter([m for _, m in self.named_children()])

    def get_parameter(self, path: str) -> Parameter:
        """The ``Parameter`` (or ``Buffer``) object at a dotted path such as ``"0.weight"``."""
        p = self._index().paths.get(path)
        if p is None:
            known = ", ".join(self._index().paths) or "none"
            raise ParameterNotFoundError(f"{type(self).__name__} has no parameter {path!r}; it has: {known}")
        return p

    def state_dict(self) -> dict:
        """``{path: array}`` of every parameter and persistent buffer (a tied parameter once, under its
        first path). The arrays are the live values, not copies."""
        return {k: p.value for k, p in self._index().entries if getattr(p, "persistent", True)}

    def load_state_dict(self, state: dict, *, strict: bool = True, allow_missing: bool = False,
                        ignore_extra: bool = False) -> Module:
        """Set parameters and buffers from a ``{path: array}`` mapping (arrays of any backend, NumPy, lists).

        All or nothing: every key, shape and dtype is checked first; if anything is wrong, one
        ``CheckpointError`` lists every missing key, every unexpected key and every mismatch, and the model
        is left exactly as it was. ``allow_missing=True`` keeps the current values of parameters that
        the mapping lacks; ``ignore_extra=True`` skips keys the model lacks; ``strict=False`` does both.
        A parameter whose shape is not known yet (a lazy layer never called) takes the stored shape.
        Floating values are cast to the parameter's floating dtype and integers widened to its integer
        dtype; other dtype differences are errors.
        On torch, values are copied into the existing tensors, so optimizers holding them stay valid.

        A ``torch.nn.Module.state_dict()`` (recognised by torch's ``_metadata``) goes through
        ``lm.load_torch``'s conversion first, so torch's layouts (``Linear``'s (out, in) weight, ...)
        never load silently into Lamina's.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict() takes a mapping {{path: array}} (as from model.state_dict()), got a "
                            f"{type(state).__name__}")
        if is_torch_state_dict(state):
            state = convert_torch_state(self, state)
        specs = {}
        for k, v in state.items():
            b = backend_of(v)
            if b is None:
                v = np.asarray(v)
                specs[k] = (v.shape, str(v.dtype))
            else:
                specs[k] = (tuple(v.shape), b.dtype_name(v))

        def host(x):
            b = backend_of(x)
            return np.asarray(x if b is None else b.to_numpy(x))

        def same(a, b):  # a tie listed under several paths (as torch's state_dict does) with equal values
            va, vb = host(state[a]), host(state[b])
            return va.shape == vb.shape and np.array_equal(va, vb)

        plan = plan_load(self, specs, {}, allow_missing or not strict, ignore_extra or not strict, "the state dict",
                         same)
        apply_load(self, plan, state.__getitem__)
        return self

    def predict(self, data, batch_size: int = 256):
        """Deprecated: use ``lm.predict(model, data)``. Kept for one release."""
        warnings.warn("Module.predict(data) is deprecated; use lm.predict(model, data)", DeprecationWarning,
                      stacklevel=2)
        # looked up at call time, not imported: module.py stands below the training loop (no import edge)
        return sys.modules["lamina.train"].predict(self, data, batch_size)

    def summary(self, *input_shapes, print_fn=print) -> str:
        """Print (and return) a table of the layers: dotted path, type, output shape, parameter count,
        then the totals (tied parameters counted once) and the parameter bytes. Builds a lazy model
        on the way, with a dry run on zeros of ``input_shapes`` (``None`` axes become 1).

        >>> import lamina as lm
        >>> lm.set_backend("numpy"); text = lm.Sequential(lm.Linear(4), lm.ReLU()).summary((None, 3), print_fn=None)
        <lamina backend 'numpy'>
        >>> print(text.splitlines()[-2])
        Total parameters: 16 (64 B), trainable: 16
        """
        return _summary(self, input_shapes, print_fn)

    # ----- modes, maintenance ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Training mode (``mode=True``) or evaluation mode for this module and all descendants."""
        for m in self.modules():
            m.__dict__["training"] = bool(mode)
        return self

    def eval(self) -> Module:
        """Evaluation mode for this module and all descendants (``train(False)``)."""
        return self.train(False)

    def apply(self, fn) -> Module:
        """Call ``fn(module)`` on every descendant, then on this module: children in registration order,
        each child's own children before it, as ``torch.nn.Module.apply`` (a shared module once)."""
        seen: set[int] = set()

        def visit(m: Module) -> None:
            for child in m._modules.values():
                if id(child) not in seen:
                    seen.add(id(child))
                    visit(child)
            fn(m)

        seen.add(id(self))
        visit(self)
        return self

    def zero_grad(self) -> None:
        """Forget the gradients of every parameter."""
        for p in self.parameters():
            p.grad = None

    def reinitialize(self, init=None, /, **inits) -> Module:
        """Draw new values for this module's parameters (not buffers).

        ``reinitialize()`` uses each parameter's own initializer; ``reinitialize(init)`` uses ``init``
        for all; ``reinitialize(weight=..., bias=...)`` picks by the parameter's own name (the last
        part of its path), leaving others alone unless ``init`` is given too. Every chosen parameter
        must have a known shape, and every name must match a parameter: otherwise nothing changes and
        an error says why. Returns the module.

        >>> import lamina as lm
        >>> lm.set_backend("numpy"); net = lm.Linear(2, 3)
        <lamina backend 'numpy'>
        >>> net.reinitialize(weight=lm.init.constant(1.0), bias=lm.init.zeros()).weight.sum()
        np.float32(6.0)
        """
        return _build.reinitialize(self, init, inits)

    # ----- copying -----------------------------------------------------------------------------------
    def __deepcopy__(self, memo):
        """An independent copy: the same structure and ties, its own parameter values (torch keeps
        ``requires_grad``), no link to the original. Caches and compiled train steps are not copied."""
        import copy

        root = self._root()
        if root.__dict__.get("_model_index") is None:  # values not drawn yet: the copy must draw the same ones
            root.__dict__["_model_index"] = _init.next_model_index()
        self._draw_parameters()
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        d = new.__dict__
        for k, v in self.__dict__.items():
            if k == "_parents":
                d[k] = []
            elif k == "_cache":
                continue
            elif k == "_backend":
                d[k] = v
            else:
                d[k] = copy.deepcopy(v, memo)
        d["_cache"] = None
        for name, p in d["_params"].items():
            p._owners.append((weakref.ref(new), name))
            p.show()  # the raw value the module shows is the copied parameter's value
        for name, child in d["_modules"].items():
            child._parents.append((weakref.ref(new), name))
        context.bump_structure()
        return new

    # ----- backends and devices ----------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The name of the backend this module's parameters live on."""
        return self._backend.name

    @property
    def device(self) -> str:
        """The device of this module's parameters (``"cpu"``, ``"cuda:0"``, ...)."""
        for _, p in self._index().entries:
            if p._value is not None:
                return p.device
        return self._device or self._backend.default_device()

    def to(self, backend: str | None = None, device: str | None = None) -> Module:
        """Move every parameter and buffer to another backend and/or device, in place; returns self.

        ``model.to("cuda:0")`` / ``model.to("cpu")`` move to a device, as in torch; ``model.to(backend="jax")``
        to another backend. Arrays are copied, never shared with the old backend's arrays (a user may still
        hold those, and training on the new backend writes in place). All or nothing: every array is
        converted before any parameter changes.
        """
        from .backends import BACKENDS

        if backend is not None and not isinstance(backend, str) or backend in (
                "float16", "bfloat16", "float32", "float64", "half", "float", "double"):
            raise TypeError(f"model.to() moves between backends and devices, not dtypes (got {backend!r}); to change "
                            "a parameter's dtype assign a new lm.Parameter with dtype=..., or cast the values you "
                            "assign")
        if (backend is not None and device is None and str(backend) not in BACKENDS
                and re.fullmatch(r"(cpu|cuda|gpu|mps|tpu|xla|meta)(:\d+)?", str(backend).lower())):
            backend, device = None, backend  # model.to("cuda:0"), as in torch
        b = get_backend(backend) if backend is not None else self._backend
        dev = b.check_device(device) if device is not None else None
        idx = self._index()
        moved = []
        for _, p in idx.entries:
            if p._value is not None:
                v = p._value
                new = b.copy(b.from_other(v, dev)) if p.backend is not b else b.to_device(v, dev)
                moved.append((p, new))
        for _, m in idx.modules:
            d = m.__dict__
            d["_backend"], d["_device"] = b, dev
            if d["_pass"] is not None:
                d["_pass"] = b.native_types
        for _, p in idx.entries:
            p._backend, p._device = b, dev
        for p, new in moved:
            p._value = None  # a moved array is a new array: do not write into the old one
            p._set_value(new)
        return self

    # ----- display -----------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        """The constructor arguments to show in ``repr`` (override in layers)."""
        return ""

    def __repr__(self) -> str:
        own = ", ".join(f"{n} {_fmt_shape(p.shape)}" for n, p in self._params.items())
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not self._modules:
            return head + ")" + (f"  [{own}]" if own else "")
        lines = [head] + ([f"  [{own}]"] if own else [])
        for name, child in self._modules.items():
            lines.append(f"  ({name}): " + repr(child).replace("\n", "\n  "))
        return "\n".join(lines) + "\n)"


# ----- containers: a list or dict of layers assigned to a module becomes one of these ---------------
class ModuleList(Module):
    """A list of layers that registers them under the keys ``"0"``, ``"1"``, ...

    Supports indexing (an int gives a layer, a slice a new container sharing the layers), ``len``,
    iteration and ``append``/``extend``.

    >>> import lamina as lm
    >>> blocks = lm.ModuleList([lm.ReLU(), lm.Tanh()]); len(blocks)
    2
    """

    def __init__(self, layers=()):
        super().__init__()
        self.__dict__["_seq"] = ()
        self.extend(layers)

    def append(self, layer: Module) -> ModuleList:
        """Add a layer at the end (registered under the next index)."""
        if not isinstance(layer, Module):
            raise TypeError(f"{type(self).__name__} holds layers (lm.Module), got {type(layer).__name__}")
        self._register_module(str(len(self._seq)), layer)
        self.__dict__["_seq"] = self._seq + (layer,)
        return self

    def extend(self, layers) -> ModuleList:
        """Append each of ``layers``."""
        for layer in layers:
            self.append(layer)
        return self

    def __getitem__(self, i):
        if isinstance(i, slice):
            return type(self)(self._seq[i])
        try:
            return self._seq[i]
        except IndexError:
            raise IndexError(f"{type(self).__name__} index {i} out of range for {len(self._seq)} layers") from None

    def __len__(self) -> int:
        return len(self._seq)

    def __iter__(self):
        return iter(self._seq)

    def forward(self, *args):
        raise NotImplementedError(
            f"{type(self).__name__} only holds layers; use lm.Sequential to chain them, or call each one")


class ModuleDict(Module):
    """A dict of layers, registered under their keys.

    >>> import lamina as lm
    >>> heads = lm.ModuleDict({"a": lm.ReLU()}); list(heads)
    ['a']
    """

    def __init__(self, layers=None):
        super().__init__()
        for k, v in dict(layers or {}).items():
            self[k] = v

    def __setitem__(self, key: str, layer: Module) -> None:
        if not isinstance(key, str) or "." in key or not key:
            raise ValueError(f"{type(self).__name__} keys are non-empty strings without '.', got {key!r}")
        if not isinstance(layer, Module):
            raise TypeError(f"{type(self).__name__} holds layers (lm.Module), got {type(layer).__name__}")
        self._unregister(key)
        self._register_module(key, layer)

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __contains__(self, key) -> bool:
        return key in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def keys(self):
        """The layer names."""
        return self._modules.keys()

    def values(self):
        """The layers."""
        return self._modules.values()

    def items(self):
        """``(name, layer)`` pairs."""
        return self._modules.items()

    def forward(self, *args):
        raise NotImplementedError(f"{type(self).__name__} only holds layers; call them by key")


def _numbers_only(items: list) -> bool:
    """True for a (nested) list of plain Python numbers: ``[1.0, 2.0]``, ``[[1, 2], [3, 4]]``."""
    return all(type(v) in (int, float, bool, complex) or (type(v) is list and _numbers_only(v)) for v in items) \
        and len(items) > 0


def _holds_modules(value) -> bool:
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, list | tuple):
        items = value
    else:
        return False
    if not any(isinstance(v, Module) for v in items):
        return False
    if not all(isinstance(v, Module) for v in items):
        raise TypeError("a list, tuple or dict of layers assigned to a module may hold only modules; "
                        f"got {[type(v).__name__ for v in items]}")
    return True


