"""Optimizers: SGD (momentum, Nesterov, weight decay), Adam and AdamW, with a learning-rate schedule hook.

Why they delegate: each backend already has a well-kept, fast implementation, so an optimizer here is a
thin, backend-neutral front for it. On torch the update is ``torch.optim`` with ``foreach=True``: the
multi-tensor kernels, which on CPU are much faster than the per-tensor loop that ``torch.optim.Adam``
runs by default, with exactly torch's arithmetic. On jax it is optax, applied inside the one
``jax.jit`` program of the train step, where XLA fuses it with the gradient computation. Writing the
update once against the Array API would be simpler to read, but slower on both (a Python loop of
small eager ops per tensor on torch), and it would be one more implementation to keep correct.

An optimizer is given a model (or Parameters) and finds the trainable parameters when it first steps,
so it can be created before a lazy model's dry run. Frozen parameters (``trainable=False``) are never
updated; a tied parameter is one parameter and is updated once. ``schedule(step) -> lr`` is called with
the number of updates done so far, in plain Python on every backend, and its value is passed into the
compiled step as data, so changing it does not recompile anything.

>>> import lamina as lm
>>> lm.set_backend("numpy"); opt = lm.optim.Adam(lm.Linear(2, 1), lr=1e-3)
<lamina backend 'numpy'>
>>> opt
Adam(lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0)
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import BackendError

__all__ = ["Optimizer", "SGD", "Adam", "AdamW"]


class Optimizer:
    """Base class: holds the parameters' source, the hyperparameters, the schedule and the step count."""

    kind = ""

    def __init__(self, params, *, lr: float, schedule: Callable[[int], float] | None = None, **hyper):
        if not (isinstance(lr, int | float) and lr >= 0):
            raise ValueError(f"{type(self).__name__}: lr must be a non-negative number, got {lr!r}")
        if schedule is not None and not callable(schedule):
            raise TypeError(f"{type(self).__name__}: schedule must be a callable step -> lr, got {schedule!r}")
        from .module import Module

        if isinstance(params, Module):
            self._model, self._params = params, None
        else:
            self._model, self._params = None, list(params)
        self.lr = float(lr)
        self.schedule = schedule
        self.hyper = hyper
        self.steps = 0  # updates done so far
        self._engine = None

    def entries(self) -> list:
        """``(name, Parameter)`` of every trainable parameter, each shared one once."""
        if self._model is not None:
            return [(k, p) for k, p in self._model.named_parameters() if p.trainable]
        seen, out = set(), []
        for i, p in enumerate(self._params):
            if id(p) not in seen and p.trainable:
                seen.add(id(p))
                out.append((p.name or str(i), p))
        return out

    def current_lr(self) -> float:
        """The learning rate of the next update: ``schedule(steps)`` if there is a schedule, else ``lr``."""
        return self.lr_at(self.steps)

    def lr_at(self, step: int) -> float:
        """The learning rate of update number ``step`` (counted from 0)."""
        return float(self.schedule(step)) if self.schedule is not None else self.lr

    def engine(self, backend):
        """The backend's implementation of this optimizer (created on first use)."""
        if self._engine is None or self._engine.backend is not backend:
            if not backend.has_autodiff:
                raise BackendError(f"the {backend.name} backend cannot train (it has no automatic "
                                   "differentiation); train on torch or jax and load the weights here")
            self._engine = backend.optimizer(self.kind, {"lr": self.lr, **self.hyper})
        return self._engine

    def _backend(self):
        entries = self.entries()
        if not entries:
            raise ValueError(f"{type(self).__name__} has no trainable parameters to update")
        return entries[0][1].backend, entries

    def step(self, grads: dict | None = None) -> None:
        """One update. ``grads``: ``{name: gradient}`` as from ``lm.value_and_grad``; without it, each
        parameter's ``.grad`` (on torch, filled by ``loss.backward()``)."""
        backend, entries = self._backend()
        if grads is None:
            grads = {k: p.grad for k, p in entries}
        missing = [k for k, _ in entries if grads.get(k) is None]
        if missing:
            raise ValueError(f"{type(self).__name__}.step(): no gradient for {missing}; compute them first "
                             "(lm.value_and_grad, or loss.backward() on torch)")
        lr = self.current_lr()
        self.engine(backend).step(entries, grads, lr)
        self.steps += 1

    def zero_grad(self) -> None:
        for _, p in self.entries():
            p.grad = None

    def state_dict(self) -> dict:
        """``{name: array}`` of the optimizer state (moments, momentum buffers, counts), backend arrays."""
        backend, entries = self._backend()
        return self.engine(backend).state_dict(entries)

    def load_state_dict(self, state: dict, steps: int | None = None) -> None:
        """Restore what ``state_dict`` gave (and the step count), so training resumes exactly."""
        backend, entries = self._backend()
        self.engine(backend).load_state_dict(entries, state)
        if steps is not None:
            self.steps = int(steps)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in {"lr": self.lr, **self.hyper}.items())
        return f"{type(self).__name__}({args}{', schedule=' + repr(self.schedule) if self.schedule else ''})"


class SGD(Optimizer):
    """Stochastic gradient descent, as ``torch.optim.SGD``: with ``momentum`` m, the buffer is
    ``b = m * b + g`` and the step ``lr * b`` (``nesterov``: ``lr * (g + m * b)``); ``weight_decay``
    adds ``weight_decay * param`` to the gradient first."""

    kind = "sgd"

    def __init__(self, params, lr: float = 0.01, *, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, schedule=None):
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        super().__init__(params, lr=lr, schedule=schedule, momentum=float(momentum), nesterov=bool(nesterov),
                         weight_decay=float(weight_decay))


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (``weight_decay`` is an L2 term added to the gradient)."""

    kind = "adam"

    def __init__(self, params, lr: float = 1e-3, *, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, schedule=None):
        super().__init__(params, lr=lr, schedule=schedule, betas=tuple(float(b) for b in betas), eps=float(eps),
                         weight_decay=float(weight_decay))


class AdamW(Adam):
    """AdamW, as ``torch.optim.AdamW``: decoupled weight decay, ``param *= 1 - lr * weight_decay``."""

    kind = "adamw"

    def __init__(self, params, lr: float = 1e-3, *, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, schedule=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, schedule=schedule)
