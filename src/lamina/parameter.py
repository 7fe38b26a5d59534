"""Parameter and Buffer: a named, shaped, initialized array that belongs to one or more modules.

A ``Parameter`` is the housekeeping around a value: shape (``None`` for an axis known only at build
time), dtype, initializer, trainable flag, the value itself (the backend's raw array) and, after a
backward pass, its gradient. Inside ``forward`` a module's ``self.weight`` is the raw array, not this
object; get the object with ``module.get_parameter("weight")`` or ``named_parameters()``.

The value is drawn the first time it is needed (the first call of the model, or the first time it is
read), when the parameter's full dotted path in its model is known: that path seeds its random stream.
"""

from __future__ import annotations

import math
import weakref

import numpy as np

from . import context
from . import init as _init
from .errors import ShapeError, UninitializedParameterError
from .tree import path_of


def _as_shape(shape) -> tuple:
    if shape is None:
        return ()
    if isinstance(shape, bool | np.bool_):
        raise TypeError(f"a parameter shape is an int or a tuple of ints, got {shape!r}")
    if isinstance(shape, int | np.integer):
        if shape < 0:
            raise ValueError(f"a parameter shape holds non-negative ints or None, got {int(shape)}; "
                             f"for a vector of {-int(shape)} write lm.Parameter(({-int(shape)},))")
        return (int(shape),)
    if isinstance(shape, float | complex | np.generic):
        raise TypeError(f"lm.Parameter takes a shape (an int or a tuple of ints) or an array, got the number "
                        f"{shape!r}; for a scalar parameter holding it write lm.Parameter(value={shape!r}), "
                        f"for an unset one of shape () lm.Parameter(())")
    try:
        items = list(shape)
    except TypeError:
        raise TypeError(f"a parameter shape is an int or a tuple of ints, got {type(shape).__name__} "
                        f"{shape!r}") from None
    out = []
    for s in items:
        if s is not None and (isinstance(s, bool | np.bool_) or not isinstance(s, int | np.integer)):
            if all(isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in items):
                raise TypeError(f"lm.Parameter got {shape!r}, which holds non-integers: a shape is a tuple of ints; "
                                f"to give the parameter these values write lm.Parameter(value={shape!r})")
            raise ValueError(f"a parameter shape holds non-negative ints or None, got {tuple(items)!r}")
        if s is not None and s < 0:
            raise ValueError(f"a parameter shape holds non-negative ints or None, got {tuple(items)!r}")
        out.append(None if s is None else int(s))
    return tuple(out)


class _GivenShapeError(ShapeError):
    """A parameter's given shape and value disagree: raised at construction, before any layer holds it."""

    def __init__(self, message: str):
        super().__init__(None, message)

    def __str__(self) -> str:
        return self.message


def _fmt_shape(shape) -> str:
    inner = ", ".join("?" if s is None else str(s) for s in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


class Parameter:
    """A trainable array of a module.

    Args:
        shape: a tuple of ints; ``None`` marks an axis that ``build`` fills in (``(None, units)``).
        init: an initializer ``init(shape, rng) -> array`` (see ``lm.init``). Default: Glorot uniform
            for 2+ axes, zeros for vectors and scalars.
        dtype: a dtype name, ``"float32"`` by default; with ``value``, the array's own dtype unless given
            (Python numbers and lists become float32, as torch's default).
        trainable: ``False`` freezes it: no gradient, never updated by an optimizer.
        order: ``"C"`` (row-major, the default) or ``"F"``: a matrix kept in column-major memory where
            the backend has strided arrays and it pays (torch: from ``COLUMN_MAJOR_FROM`` = 4,096
            elements), as ``torch.nn.Linear`` keeps its weight. Values, shape and gradients are the same
            either way; ``Linear`` asks for ``"F"`` for its (in, out) weight, whose product ``x @ weight``
            torch's CPU kernels compute faster from that memory (784 -> 512: 6% forward).
        value: an initial array instead of ``shape`` and ``init`` (its shape and dtype are kept). A
            ``shape`` given with it must be the value's (a ``ShapeError`` otherwise). ``lm.Parameter(2.5)`` or
            ``lm.Parameter([1.0, 2.0])`` is a ``TypeError`` pointing to ``value=``: a list of ints is a shape.

    Example:
        >>> import lamina as lm
        >>> class Scale(lm.Module):
        ...     def __init__(self, n):
        ...         super().__init__()
        ...         self.gain = lm.Parameter((n,), init=lm.init.ones())
        ...     def forward(self, x):
        ...         return x * self.gain
        >>> Scale(3).get_parameter("gain").shape
        (3,)
    """

    _is_buffer = False
    _order = "C"  # (a class default: parameters pickled before the option existed are row-major)

    def __init__(self, shape=None, init=None, *, dtype: str | None = None, trainable: bool = True,
                 value=None, order: str = "C"):
        if value is None and shape is not None and _is_array(shape):
            value, shape = shape, None  # lm.Parameter(array), as torch.nn.Parameter(tensor)
        if value is not None:
            from_array = _is_array(value)
            array = np.array(_on_host(value), copy=True)
            if dtype is not None:
                array = array.astype(str(dtype).removeprefix("torch."))
            elif not from_array and array.dtype == np.float64:
                array = array.astype(np.float32)  # Python numbers and lists: the default float dtype, as torch
            if shape is not None and _as_shape(shape) != array.shape:
                raise _GivenShapeError(f"lm.Parameter was given shape {_fmt_shape(_as_shape(shape))} and a value of "
                                       f"shape {_fmt_shape(array.shape)}; give one of them (the value's shape is "
                                       f"used), or reshape the value to {_fmt_shape(_as_shape(shape))}")
            shape = array.shape
            dtype = str(array.dtype)
            init = _Fixed(array)
        self.shape = _as_shape(shape)
        self.dtype = str(dtype if dtype is not None else "float32").removeprefix("torch.")
        if init is not None and not callable(init):
            raise TypeError(f"init must be an initializer callable init(shape, rng), got {init!r}")
        self.init = init if init is not None else (
            _init.xavier_uniform() if len(self.shape) >= 2 else _init.zeros())
        self._check_order(order)
        if order == "F":
            self._order = "F"
        self._trainable = bool(trainable)
        self.name = ""  # the attribute name it was first registered under
        self._value = None
        self._grad = None
        self._seed = _init.current_seed()
        self._draws = 0  # how many times values were drawn; part of the random stream's key
        self._owners: list[tuple[weakref.ref, str]] = []
        self._backend = None
        self._device = None

    @staticmethod
    def of(array) -> Parameter | None:
        """The parameter whose current value is ``array`` (what ``module.weight`` gives inside ``forward``
        or ``apply``), or None.

        >>> import lamina as lm
        >>> lm.set_backend("numpy"); layer = lm.Linear(2, 3)
        <lamina backend 'numpy'>
        >>> lm.Parameter.of(layer.weight) is layer.get_parameter("weight")
        True
        """
        return context.parameter_of(array)

    @property
    def owner(self):
        """The first module that holds this parameter (whose ``forward`` reads it), or None for a free one."""
        return self._owner_module()

    def own_references(self) -> int:
        """How many references Lamina itself keeps to the current value: the parameter's, and one for each
        owner module that shows it as an attribute. A training room compares the value's reference count
        with this to tell whether anyone else (a ``state_dict()`` snapshot, a callback) holds it too."""
        v = self._value
        if v is None:
            return 0
        return 1 + sum(1 for ref, name in self._owners if (m := ref()) is not None and m.__dict__.get(name) is v)

    @property
    def is_buffer(self) -> bool:
        """True for a ``Buffer`` (never trained; saved unless ``persistent=False``)."""
        return self._is_buffer

    @property
    def path(self) -> str:
        """The parameter's dotted path in its outermost model (``"encoder.0.weight"``): its identity in
        checkpoints, optimizer state and errors. Just its name while no module holds it."""
        owner = self._owner_module()
        if owner is None:
            return self.name
        for path, p in owner._root()._index().entries:
            if p is self:
                return path
        return self.name

    # ----- shape -------------------------------------------------------------------------------------
    @property
    def is_built(self) -> bool:
        """True once every axis of the shape is known."""
        return None not in self.shape

    @property
    def ndim(self) -> int:
        """The number of axes."""
        return len(self.shape)

    @property
    def size(self) -> int | None:
        """The number of elements (None while the shape is unknown)."""
        return math.prod(self.shape) if self.is_built else None

    @property
    def nbytes(self) -> int | None:
        """The size of the value in bytes (None while the shape is unknown)."""
        if not self.is_built:
            return None
        itemsize = 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize
        return self.size * itemsize

    def materialize(self, shape) -> Parameter:
        """Fix the axes marked ``None`` (call it from ``build``). Known axes must agree."""
        shape = _as_shape(shape)
        if len(shape) != len(self.shape) or any(
                a is not None and a != b for a, b in zip(self.shape, shape)):
            raise ShapeError(self._owner_module(), f"parameter '{self.name}' was declared with shape "
                             f"{_fmt_shape(self.shape)} and cannot become {_fmt_shape(shape)}")
        if None in shape:
            raise ValueError(f"materialize() needs a full shape, got {_fmt_shape(shape)}")
        self.shape = shape
        return self

    # ----- value -------------------------------------------------------------------------------------
    @property
    def value(self):
        """The backend array. Drawn from the initializer on first access (see the module docstring)."""
        if self._value is None:
            self._draw()
        return self._value

    @value.setter
    def value(self, new):
        self._assign(new)

    @property
    def grad(self):
        """The gradient of the last backward pass: ``loss.backward()`` on torch (it is the tensor's
        ``.grad``), ``lm.value_and_grad`` on every backend with autodiff. ``None`` before any."""
        if self._value is not None and hasattr(self._value, "grad") and self._value.grad is not None:
            return self._value.grad
        return self._grad

    @grad.setter
    def grad(self, g):
        if self._value is not None and hasattr(self._value, "grad"):
            self._value.grad = g
        else:
            self._grad = g

    @property
    def trainable(self) -> bool:
        """Whether gradients are taken for it and optimizers update it."""
        return self._trainable

    @trainable.setter
    def trainable(self, flag: bool) -> None:
        self._trainable = bool(flag)
        context.bump_structure()  # what an optimizer updates has changed: compiled train steps must see it
        if self._value is not None and not self._is_buffer:
            self.backend.set_trainable(self._value, self._trainable)

    @property
    def order(self) -> str:
        """The memory order of the value: ``"C"`` (row-major) or ``"F"`` (column-major; see the constructor).
        Setting it lays the value out anew where the backend has strided arrays (torch: a new tensor with the
        same values, which an optimizer picks up with its state, as after ``model.to``)."""
        return self._order

    @order.setter
    def order(self, order: str) -> None:
        self._check_order(order)
        self._order = order
        if self._value is not None and not self._is_buffer:
            self._set_value(self._value, in_place=False)

    def _check_order(self, order) -> None:
        if order not in ("C", "F") or (order == "F" and len(self.shape) != 2):
            raise ValueError(f"lm.Parameter: order is 'C' (row-major) or 'F' (column-major, for a matrix), got "
                             f"order={order!r} for shape {_fmt_shape(self.shape)}")

    @property
    def backend(self):
        """The backend adapter the value lives on."""
        if self._backend is not None:  # (read for every value set: the import below costs ~1 us)
            return self._backend
        from .backends import get_backend

        return get_backend()

    @property
    def device(self) -> str | None:
        """The device of the value (None before it is drawn)."""
        return None if self._value is None else self.backend.device_of(self._value)

    def initialize(self, init=None) -> Parameter:
        """Draw new values with ``init`` (default: this parameter's own initializer), which it keeps."""
        if init is not None:
            if not callable(init):
                raise TypeError(f"init must be an initializer callable init(shape, rng), got {init!r}")
            self.init = init
        if not self.is_built:
            raise UninitializedParameterError(self._unbuilt_message("re-initialize"))
        self._draw(redraw=True)
        return self

    def __array__(self, dtype=None, copy=None):
        """``np.asarray(parameter)``: its values on the host."""
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def numpy(self) -> np.ndarray:
        """The value as a NumPy array (a copy or a read-only view)."""
        return self.backend.to_numpy(self.value)

    # ----- internals ---------------------------------------------------------------------------------
    def _owner_module(self):
        for ref, _ in self._owners:
            m = ref()
            if m is not None:
                return m
        return None

    def _unbuilt_message(self, what: str = "read") -> str:
        owner = self._owner_module()
        where, path = "", self.name or "?"
        if owner is not None:
            prefix = path_of([owner])
            where, path = f" of {type(owner).__name__}", f"{prefix}.{path}" if prefix else path
        return (f"cannot {what} parameter '{path}'{where}: its shape {_fmt_shape(self.shape)} "
                "is not known yet because the layer infers it from its first input. Call the model once "
                "on a batch (model(x)) or build it with model.build(input_shape) first.")

    def _draw(self, redraw: bool = False) -> None:
        owner = self._owner_module()
        if owner is not None:
            owner._draw_parameters(only=self if redraw else None)
        else:
            self._set_drawn(_init.rng_for(self.name, self._seed, 0, self._draws))
        if self._value is None:
            raise UninitializedParameterError(self._unbuilt_message())

    def _set_drawn(self, rng) -> None:
        if not self.is_built:
            raise UninitializedParameterError(self._unbuilt_message())
        values = np.asarray(_on_host(self.init(self.shape, rng)))
        if values.shape != self.shape:
            raise ShapeError(self._owner_module(), f"initializer {self.init!r} of parameter '{self.name}' "
                             f"returned shape {values.shape}, expected {_fmt_shape(self.shape)}")
        self._draws += 1
        self._set_value(self.backend.from_numpy(values.astype(_np_dtype(self.dtype)), self._device))

    # ----- the one keeper of "each owner's __dict__[name] is the current value" ---------------------
    def set_value(self, array, *, trusted: bool = False) -> None:
        """Store ``array`` (an array of this parameter's backend, with its shape and dtype) as the value,
        without converting or copying it, and show it to every module that owns the parameter.

        This is the one way a value is replaced (optimizers, train steps and checkpoint loads use it);
        ``p.value = x`` is the user-facing form that converts, casts and copies. ``trusted=True`` skips
        the shape and dtype check, for values that a compiled step computed from this parameter.
        """
        if not trusted:
            b = self.backend
            if not b.is_native(array):
                raise TypeError(f"parameter '{self.name}' lives on the {b.name} backend; set_value() takes a "
                                f"{b.array_name}, got {type(array).__name__} (assign p.value = x to convert)")
            shape = tuple(array.shape)
            if self.is_built and shape != self.shape:
                raise ShapeError(self._owner_module(), f"parameter '{self.name}' has shape {_fmt_shape(self.shape)}; "
                                 f"cannot set a value of shape {_fmt_shape(shape)}")
            if b.dtype_name(array) != b.canonical_dtype(self.dtype):
                raise TypeError(f"parameter '{self.name}' has dtype {self.dtype}; cannot set a value of dtype "
                                f"{b.dtype_name(array)} (assign p.value = x to cast)")
        self._set_value(array)

    def show(self, value=None) -> None:
        """Show ``value`` to the owning modules' ``forward`` in place of the stored value, without storing
        it (pure calls use it for the arrays they are given); ``show()`` shows the stored value again."""
        if value is None:
            value = self._value
        for ref, name in self._owners:
            m = ref()
            if m is not None:
                if value is None:
                    m.__dict__.pop(name, None)
                else:
                    m.__dict__[name] = value

    def _set_value(self, array, in_place: bool = True) -> None:
        if not self._is_buffer:
            array = self.backend.make_parameter(array, self.trainable, self._order)
        old = self._value
        if old is not None and in_place:
            array = self.backend.assign(old, array)
        if array is not old:
            context.note_value(old, array, self)
        self._value = array
        self._grad = None
        self.show()

    def assign(self, new, *, copy: bool = True) -> None:
        """Store the values of ``new`` (an array of any backend, NumPy, a list): converted to this
        parameter's backend and device, cast to its dtype, its shape checked (``p.value = new`` is the
        same). ``copy=False``: the caller hands over an array of this backend that nobody else holds, which
        becomes the value without a copy (a checkpoint load does this)."""
        self._assign(new, fresh=not copy)

    def written_in_place(self) -> None:
        """Tell the parameter that its value's memory was written directly (a checkpoint read straight into
        it): the backend is told (torch bumps the tensor's version counter, so autograd refuses graphs
        recorded before), and the old gradient is forgotten."""
        if self._value is not None:
            self.backend.mark_written(self._value)
        self._grad = None

    def _assign(self, new, fresh: bool = False) -> None:
        """Set the value from user data, keeping shape and dtype (values are cast to the dtype).

        The parameter never shares memory with the caller's array: values are copied into the current
        array where there is one, and copied otherwise unless ``fresh`` (the caller hands over an array
        nobody else holds, as a checkpoint load does).
        """
        from .backends import backend_of

        b = self.backend
        other = backend_of(new)
        if other is b and b.is_traced(new):
            from .errors import ModuleError

            raise ModuleError(f"'{self.name}' was assigned a traced value (the layer ran inside jax.jit or "
                              "jax.grad without lm.functional_call); call the model through "
                              "lm.functional_call(model, params, x, return_buffers=True) to get updated buffers")
        if other is None:
            new, fresh = b.from_numpy(np.asarray(new, dtype=_np_dtype(self.dtype)), self._device), True
        elif other is not b:
            new = b.from_other(new, self._device)
        shape = tuple(new.shape)
        if self.is_built and shape != self.shape:
            raise ShapeError(self._owner_module(), f"parameter '{self.name}' has shape "
                             f"{_fmt_shape(self.shape)}; cannot assign an array of shape {_fmt_shape(shape)} "
                             "(to change its shape, assign a new lm.Parameter)")
        if not self.is_built:
            self.materialize(shape)
        if b.dtype_name(new) != b.canonical_dtype(self.dtype):
            new, fresh = b.xp.astype(new, b.dtype(self.dtype)), True
        if new is self._value:
            return
        if not fresh and (self._value is None or other not in (None, b)):
            # nothing to copy into, or converted from another library's array (DLPack may share its memory,
            # which its owner can still write: NumPy's and torch's arrays are mutable)
            new = b.copy(new)
        self._set_value(new)

    def __deepcopy__(self, memo):
        """A parameter with its own copy of the value; it belongs to no module until one registers it
        (``Module.__deepcopy__`` does, so a copied model's ties are kept and point at the copy)."""
        import copy

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k == "_owners":
                new.__dict__[k] = []
            elif k in ("_backend", "init"):
                new.__dict__[k] = v
            else:
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def __repr__(self) -> str:
        kind = type(self).__name__
        frozen = "" if self.trainable or self._is_buffer else ", trainable=False"
        return f"{kind}(shape={_fmt_shape(self.shape)}, dtype={self.dtype}, init={self.init!r}{frozen})"


class Buffer(Parameter):
    """A non-trainable array that moves, saves and loads with the model (running statistics, masks,
    constant tables). ``persistent=False`` keeps it out of checkpoints.

    >>> import lamina as lm, numpy as np
    >>> lm.Buffer(np.arange(3)).dtype
    'int64'
    """

    _is_buffer = True

    def __init__(self, value=None, *, shape=None, init=None, dtype: str = "float32", persistent: bool = True):
        if value is not None and not isinstance(value, tuple):
            super().__init__(shape, value=value, trainable=False)
        else:
            super().__init__(shape if shape is not None else value, init or _init.zeros(), dtype=dtype,
                             trainable=False)
        self.persistent = persistent


class _Fixed:
    """The initializer of a parameter created from an array: it gives back that array."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __call__(self, shape, rng):
        return self.array

    def __repr__(self) -> str:
        return "<given values>"


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _is_array(x) -> bool:
    from .backends import backend_of

    return isinstance(x, np.ndarray) or backend_of(x) is not None


def _on_host(x):
    """A host (NumPy-convertible) view of ``x``: arrays of any backend, lists, scalars."""
    from .backends import backend_of

    b = backend_of(x)
    return x if b is None else b.to_numpy(x)
