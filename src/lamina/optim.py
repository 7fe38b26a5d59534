"""Optimizers: SGD (momentum, Nesterov, weight decay), Adam and AdamW, with a learning-rate schedule hook.

Each optimizer states its update rule once, here, as plain array arithmetic that runs on any array
namespace (``xp``: ``jax.numpy``, the torch namespace, ...):

- ``slots``: the names of its per-parameter state arrays (``"exp_avg"``, ``"exp_avg_sq"``, ...), each
  starting as zeros of the parameter's shape;
- ``scalars(lr, step) -> float32 vector``: the per-step numbers (learning rate, bias corrections),
  computed on the host in double precision and rounded once to float32, as ``torch.optim`` does; they
  enter a compiled step as data, so a schedule never recompiles it;
- ``update(param, grad, state, scalars, xp) -> (new_param, new_state)``: one parameter's update.

Where the rule runs is the business of ``lamina.training`` (one room per backend): on jax it runs inside
the one ``jax.jit`` program of the train step, where XLA fuses it with the gradient; on torch an optimizer
that names a ``torch_class`` runs as that ``torch.optim`` class (its multi-tensor or fused kernels, with
exactly torch's arithmetic), and any other runs its ``update`` eagerly. So a new optimizer is one class
here: write ``slots``, ``scalars`` and ``update``, and it trains on every backend that can train.

Parameters are identified by their full dotted path in their model (``"encoder.0.weight"``), the same
key as in ``named_parameters()``, checkpoints and errors; the optimizer's state is keyed by it
(``"encoder.0.weight/exp_avg"``). A parameter given in a list is named by its path through its owner
modules (a parameter that belongs to no module: by its position in the list). An optimizer is given a
model (or Parameters) and finds the trainable parameters when it first steps, so it can be created before
a lazy model's dry run. Frozen parameters (``trainable=False``) are never updated; a tied parameter is
one parameter and is updated once. ``schedule(step) -> lr`` is called with the number of updates done so
far, in plain Python on every backend.

>>> import lamina as lm
>>> lm.set_backend("numpy"); opt = lm.optim.Adam(lm.Linear(2, 1), lr=1e-3)
<lamina backend 'numpy'>
>>> opt
Adam(lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from . import context
from .errors import few_names

__all__ = ["Optimizer", "SGD", "Adam", "AdamW"]


class Optimizer:
    """Base class: the parameters, the hyperparameters, the schedule, the step count and the update rule.

    A subclass states its rule with ``slots``, ``scalars`` and ``update`` (see the module docstring);
    ``torch_class`` (a name in ``torch.optim``) with ``torch_kwargs()`` lets the torch backend use
    torch's own implementation of the same rule.

    Example: sign-SGD with momentum, which trains on torch and jax alike.

    >>> import lamina as lm
    >>> class SignSGD(lm.optim.Optimizer):
    ...     slots = ("velocity",)
    ...     def __init__(self, params, lr=0.01):
    ...         super().__init__(params, lr=lr)
    ...     def update(self, param, grad, state, scalars, xp):
    ...         v = 0.9 * state["velocity"] + grad
    ...         return param - scalars[0] * xp.sign(v), {"velocity": v}
    """

    #: names of the per-parameter state arrays (zeros of the parameter's shape at the start)
    slots: tuple = ()
    #: the ``torch.optim`` class that computes the same rule (None: the torch backend runs ``update``)
    torch_class: str | None = None

    def __init__(self, params, *, lr: float, schedule: Callable[[int], float] | None = None, **hyper):
        name = type(self).__name__
        if not (isinstance(lr, int | float) and not isinstance(lr, bool) and lr >= 0):
            raise ValueError(f"{name}: lr must be a non-negative number, got {lr!r}")
        if schedule is not None and not callable(schedule):
            raise TypeError(f"{name}: schedule must be a callable step -> lr, got {schedule!r}")
        from .module import Module
        from .parameter import Parameter

        if isinstance(params, Module):
            self._model, self._params = params, None
        else:
            if isinstance(params, int | float | np.number) or not hasattr(params, "__iter__"):
                raise TypeError(f"{name}: the model or its parameters come first, then the learning rate: "
                                f"lm.optim.{name}(model, lr=...) or lm.optim.{name}([param, ...], lr=...); "
                                f"got {params!r} as the first argument")
            self._params = list(params)
            self._model = None
            seen: set[int] = set()
            for i, p in enumerate(self._params):
                if not isinstance(p, Parameter):
                    raise TypeError(f"{name}: parameters must be lm.Parameter objects (module.parameters(), "
                                    f"module.get_parameter(path)) or a model; item {i} is {type(p).__name__}")
                if p._is_buffer:
                    raise TypeError(f"{name}: item {i} is a Buffer, which optimizers never update")
                if id(p) in seen:
                    raise ValueError(f"{name}: parameter '{p.name}' (item {i}) is given twice; give each "
                                     "parameter once (a tied parameter is one parameter)")
                seen.add(id(p))
        self.lr = float(lr)
        self.schedule = schedule
        self.hyper = hyper
        self.steps = 0  # updates done so far
        self._engine = None
        #: the train steps ``fit`` built for this optimizer (per model, loss and compile choice), kept so
        #: that calling ``fit`` again does not compile again; they go when the optimizer goes
        self.step_cache: dict = {}
        self._named: tuple | None = None  # (structure version, [(path, trainable Parameter)])
        self._paths: tuple | None = None  # (structure version, {name: path in the whole model}), see step

    # ----- the update rule (override in subclasses) ---------------------------------------------------
    def scalars(self, lr: float, step: int) -> np.ndarray:
        """The per-step scalars of update number ``step`` (counted from 1) as a float32 vector."""
        return np.array([lr], np.float32)

    def scalar_table(self, lrs, first: int) -> np.ndarray:
        """``scalars`` of the updates ``first, first + 1, ...`` with the learning rates ``lrs``, one row per
        update (a compiled step reads its row; a subclass may compute it faster, with the same numbers)."""
        if type(self).scalars is Optimizer.scalars:
            return np.asarray(lrs, np.float32).reshape(-1, 1)
        return np.stack([self.scalars(lr, first + i) for i, lr in enumerate(lrs)])

    def update(self, param, grad, state: dict, scalars, xp):
        """One parameter's update: returns ``(new_param, new_state)`` (``state``: ``{slot: array}``)."""
        raise NotImplementedError(f"{type(self).__name__} must define update(param, grad, state, scalars, xp)")

    def torch_kwargs(self) -> dict:
        """Keyword arguments of ``torch_class`` for these hyperparameters."""
        return {"lr": self.lr, **self.hyper}

    # ----- parameters ----------------------------------------------------------------------------------
    def entries(self) -> list:
        """``(path, Parameter)`` of every trainable parameter, each shared one once (a new list each call)."""
        version = context.structure_version()  # (a trainable flag flipping changes it too)
        if self._named is None or self._named[0] != version:
            named = self._model.named_parameters() if self._model is not None else _names_of(self._params)
            self._named = (version, [(k, p) for k, p in named if p.trainable])
        return list(self._named[1])

    def current_lr(self) -> float:
        """The learning rate of the next update: ``schedule(steps)`` if there is a schedule, else ``lr``."""
        return self.lr_at(self.steps)

    def lr_at(self, step: int) -> float:
        """The learning rate of update number ``step`` (counted from 0)."""
        return float(self.schedule(step)) if self.schedule is not None else self.lr

    def engine(self, backend):
        """The object that applies this optimizer's updates on ``backend`` (created on first use; see
        ``lamina.training``): ``step(entries, grads, lr)``, ``state_dict(entries)``, ``load_state_dict``."""
        if self._engine is None or self._engine.backend is not backend:
            from .training import trainer_for

            old = self._engine
            carried = old.export() if old is not None and hasattr(old, "export") else {}
            self._engine = trainer_for(backend).engine(self, backend)
            self.step_cache.clear()  # fit's cached train steps hold the old engine
            if carried:  # the model moved (model.to(backend=...)): its moments and step count move with it
                try:
                    self.load_state_dict(carried)
                except ValueError as e:
                    warnings.warn(f"{type(self).__name__}: the optimizer state could not follow the model to the "
                                  f"{backend.name} backend and starts afresh ({e})", RuntimeWarning, stacklevel=2)
        return self._engine

    def _backend(self):
        entries = self.entries()
        if not entries:
            raise ValueError(f"{type(self).__name__} has no trainable parameters to update")
        return entries[0][1].backend, entries

    def step(self, grads: dict | None = None) -> None:
        """One update. ``grads``: ``{path: gradient}`` as from ``lm.value_and_grad``; without it, each
        parameter's ``.grad`` (on torch, filled by ``loss.backward()``)."""
        backend, entries = self._backend()
        from .training.torch_module import shard_entries  # under FSDP2's fully_shard: the module's shards

        entries = shard_entries(self, entries, grads)
        given = grads is not None
        if not given:
            grads = {k: p.grad for k, p in entries}
        else:
            grads = self._by_model_path(entries, grads)
        missing = [k for k, _ in entries if grads.get(k) is None]
        if missing:
            name = type(self).__name__
            if given and grads and not any(k in grads for k, _ in entries):  # not one name in common
                raise ValueError(f"{name}.step(): the optimizer was made for other parameters than those of the "
                                 f"gradients: it updates {few_names(missing)}, the gradients are for "
                                 f"{few_names(list(grads))}; pass the gradients of the model it was made for, or "
                                 f"create it for the model you differentiate: lm.optim.{name}(model)")
            raise ValueError(f"{name}.step(): no gradient for {missing}; compute them first "
                             "(lm.value_and_grad, or loss.backward() on torch)")
        lr = self.current_lr()
        self.engine(backend).step(entries, grads, lr)
        self.steps += 1

    def _by_model_path(self, entries: list, grads: dict) -> dict:
        """``grads`` by this optimizer's names, taken by each parameter's path in its whole model where
        ``grads`` has them all: an optimizer over a part of a model (``lm.optim.Adam(model.head)``) names its
        parameters within the part (``"weight"``), ``lm.value_and_grad`` of the whole model names them in the
        model (``"head.weight"``), and the model may have a ``"weight"`` of its own, whose gradient is not the
        head's. All or nothing: ``grads`` as given unless every parameter has a gradient under its path (the
        gradients of the part itself). Free when every name is its path (an optimizer over the whole model)."""
        version = context.structure_version()
        if self._paths is None or self._paths[0] != version:
            paths = {k: path for (k, _), path in zip(entries, _model_paths(p for _, p in entries)) if path is not None}
            self._paths = (version, paths if any(paths.get(k, k) != k for k, _ in entries) else None)
        paths = self._paths[1]
        if paths is None:
            return grads
        found = {k: grads.get(paths.get(k)) for k, _ in entries}
        return found if all(g is not None for g in found.values()) else grads

    def zero_grad(self) -> None:
        """Forget every parameter's gradient."""
        from .training.torch_module import shard_entries  # under FSDP2's fully_shard: the module's shards

        for _, p in shard_entries(self, self.entries(), stepping=False):
            p.grad = None

    def state_dict(self) -> dict:
        """``{"<path>/<slot>": array}`` of the optimizer state (moments, momentum buffers, and each
        parameter's update count as ``"<path>/step"``), backend arrays."""
        backend, entries = self._backend()
        return self.engine(backend).state_dict(entries)

    def load_state_dict(self, state: dict, steps: int | None = None) -> None:
        """Restore what ``state_dict`` gave (and the step count), so training resumes exactly.

        All or nothing: every key, shape and dtype is checked first, and on any problem a ``ValueError``
        lists them all and nothing is changed. An empty mapping resets the state (as before any step)."""
        backend, entries = self._backend()
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 0):
            raise ValueError(f"{type(self).__name__}.load_state_dict: steps must be a non-negative int, "
                             f"got {steps!r}")
        host = _check_state(type(self).__name__, self.slots, entries, state)
        self.engine(backend).load_state_dict(entries, host)
        if steps is not None:
            self.steps = int(steps)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in {"lr": self.lr, **self.hyper}.items())
        return f"{type(self).__name__}({args}{', schedule=' + repr(self.schedule) if self.schedule else ''})"


class SGD(Optimizer):
    """Stochastic gradient descent, as ``torch.optim.SGD``: with ``momentum`` m, the buffer is
    ``b = m * b + g`` and the step ``lr * b`` (``nesterov``: ``lr * (g + m * b)``); ``weight_decay``
    adds ``weight_decay * param`` to the gradient first."""

    torch_class = "SGD"

    def __init__(self, params, lr: float = 0.01, *, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, schedule=None):
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        super().__init__(params, lr=lr, schedule=schedule, momentum=float(momentum), nesterov=bool(nesterov),
                         weight_decay=float(weight_decay))
        self.slots = ("momentum_buffer",) if momentum else ()

    def update(self, param, grad, state, scalars, xp):
        h = self.hyper
        g = grad
        if h["weight_decay"]:
            g = g + h["weight_decay"] * param
        new_state = {}
        if self.slots:  # the first buffer is g itself: 0 * m + g, as torch's
            m = h["momentum"]
            buf = state["momentum_buffer"] * m + g
            new_state["momentum_buffer"] = buf
            g = g + m * buf if h["nesterov"] else buf
        return param + (-scalars[0]) * g, new_state


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (``weight_decay`` is an L2 term added to the gradient), in torch's
    order of operations, so every backend follows torch's trajectory (checked within 1e-6 over 100 steps)."""

    torch_class = "Adam"
    slots = ("exp_avg", "exp_avg_sq")
    decoupled = False  # AdamW: weight decay scales the parameter instead

    def __init__(self, params, lr: float = 1e-3, *, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, schedule=None):
        super().__init__(params, lr=lr, schedule=schedule, betas=tuple(float(b) for b in betas), eps=float(eps),
                         weight_decay=float(weight_decay))

    def scalars(self, lr, step):
        """``[lr, lr / (1 - b1**t), sqrt(1 - b2**t), 1 - lr * weight_decay]`` in double, then float32."""
        b1, b2 = self.hyper["betas"]
        return np.array([lr, lr / (1 - b1**step), (1 - b2**step) ** 0.5, 1 - lr * self.hyper["weight_decay"]],
                        np.float32)

    def scalar_table(self, lrs, first):
        """``scalars`` for many updates at once: the same numbers (the powers in Python floats, as there)."""
        if type(self).scalars is not Adam.scalars:  # a subclass with its own scalars: stack those
            return super().scalar_table(lrs, first)
        b1, b2 = self.hyper["betas"]
        steps = range(first, first + len(lrs))
        lr = np.asarray(lrs, np.float64)
        return np.stack([lr, lr / (1 - np.array([b1**t for t in steps])), np.array([(1 - b2**t) ** 0.5 for t in steps]),
                         1 - lr * self.hyper["weight_decay"]], axis=1).astype(np.float32)

    def update(self, param, grad, state, scalars, xp):
        h = self.hyper
        b1, b2 = h["betas"]
        g = grad
        if self.decoupled:
            param = param * scalars[3]
        elif h["weight_decay"]:
            g = g + h["weight_decay"] * param
        m = state["exp_avg"]
        m = m + (1 - b1) * (g - m)  # torch.lerp for weights below 0.5
        v = state["exp_avg_sq"] * b2 + (1 - b2) * (g * g)
        denom = xp.sqrt(v) / scalars[2] + h["eps"]
        return param + (-scalars[1]) * (m / denom), {"exp_avg": m, "exp_avg_sq": v}


class AdamW(Adam):
    """AdamW, as ``torch.optim.AdamW``: decoupled weight decay, ``param *= 1 - lr * weight_decay``."""

    torch_class = "AdamW"
    decoupled = True

    def __init__(self, params, lr: float = 1e-3, *, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, schedule=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, schedule=schedule)


# ----- helpers --------------------------------------------------------------------------------------
def _names_of(params: list) -> list:
    """``(path, Parameter)`` for a list of parameters: each one's first dotted path in its whole model
    (through its owner modules), or its position in the list when it belongs to no module. Parameters of
    different models that share a path are told apart by their position (``"weight@1"``)."""
    named = [[str(i) if path is None else path, p] for i, (p, path) in enumerate(zip(params, _model_paths(params)))]
    counts: dict = {}
    for k, _ in named:
        counts[k] = counts.get(k, 0) + 1
    for i, entry in enumerate(named):
        if counts[entry[0]] > 1:
            entry[0] = f"{entry[0]}@{i}"
    return [(k, p) for k, p in named]


def _model_paths(params) -> list:
    """Each parameter's first dotted path in its whole model (through its owner modules), or None where it
    belongs to no module (an FSDP2 shard has no owner either)."""
    from .tree import root_of

    maps: dict = {}  # id(root) -> {id(parameter): path}
    out = []
    for p in params:
        owner = getattr(p, "owner", None)
        root = root_of(owner) if owner is not None else None
        if root is not None and id(root) not in maps:
            maps[id(root)] = {id(q): path for path, q in root.named_parameters()}
        out.append(None if root is None else maps[id(root)].get(id(p)))
    return out


def _check_state(name: str, slots: tuple, entries: list, state) -> dict:
    """Validate a whole optimizer state before anything is changed: ``{key: NumPy array}`` or ValueError."""
    if not isinstance(state, dict):
        raise TypeError(f"{name}.load_state_dict takes a mapping {{'<path>/<slot>': array}}, got "
                        f"{type(state).__name__}")
    if not state:
        return {}
    from .backends import backend_of

    shapes = {k: (tuple(p.shape), p.dtype) for k, p in entries}
    problems, host = [], {}
    for key, value in state.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r} is not a string")
            continue
        path, _, slot = key.rpartition("/")
        if path not in shapes or slot not in (*slots, "step"):
            problems.append(f"unexpected key '{key}'")
            continue
        b = backend_of(value)
        try:
            a = np.asarray(b.to_numpy(value) if b is not None else value)
        except Exception as e:  # noqa: BLE001 - reported with the key
            problems.append(f"'{key}' is not an array ({type(value).__name__}: {e})")
            continue
        shape, dtype = shapes[path]
        if slot == "step":
            if a.size != 1 or a.dtype.kind not in "iuf" or not np.isfinite(a).all() or float(a.reshape(-1)[0]) < 0:
                problems.append(f"'{key}' must be one non-negative number, got shape {a.shape} dtype {a.dtype}")
                continue
        else:
            if a.shape != shape:
                problems.append(f"'{key}' has shape {a.shape}, the parameter has {shape}")
                continue
            if str(a.dtype) != dtype:
                problems.append(f"'{key}' has dtype {a.dtype}, the parameter has {dtype}")
                continue
        host[key] = a
    expected = {f"{k}/{s}" for k in shapes for s in (*slots, "step")}
    missing = sorted(expected - set(state))
    if missing:
        problems.append(f"missing keys {missing}")
    if problems:
        raise ValueError(f"{name}.load_state_dict: the state does not fit this optimizer, nothing was loaded:\n  "
                         + "\n  ".join(problems))
    return host
