"""The interface every training room implements, and the pieces the rooms share.

A room is a module (``training/torch.py``, ``training/jax.py``) with two functions:

``make_step(model, loss_fn, optimizer, compile, outputs) -> step``
    ``step(x, y, lr) -> (loss, out)`` does one forward, backward and update of ``model`` (inputs and
    targets already arrays of the model's backend; ``x`` may be a tuple or dict of several inputs, see
    ``call``), with the learning rate ``lr``; ``loss`` is a scalar
    array of the backend (``fit`` reads it back to the host only when something shows it), ``out`` the
    outputs, or ``None`` when ``outputs`` is false. ``compile``: ``None`` for the room's default, ``True``
    or ``False`` to ask for a compiled (``jax.jit``, ``torch.compile``) or eager step. The step may offer
    ``step.many(xs, ys, lrs) -> losses``: ``len(lrs)`` steps on batches stacked along a new leading axis,
    as one call (``None`` where it does not), ``step.epoch(x, y, order, batch_size, k, lr_at, start, sync,
    each)``:
    the steps of a whole epoch over arrays (see ``training/jax.py``; ``None`` from it, or no such
    attribute: ``fit`` cuts the batches itself), and ``step.group(x) -> int``: how many steps ``fit`` should
    group per call for batches like ``x`` (1: no grouping), ``step.convert(a)``: how ``fit`` should hand
    it a batch (default: the model's own input conversion), and ``step.forget()``: from now on, treat every
    current value as held by the user, and look again at what forward reads besides the arrays (``fit``
    calls it where user code may have run). The update of a
    step is the one that ``optimizer.update`` states (or its ``torch_class``), as ``engine`` applies it.

``engine(optimizer, backend) -> Engine``
    The object that applies ``optimizer``'s updates eagerly, outside a train step (a user's own loop with
    ``lm.value_and_grad`` and ``opt.step(grads)``):

    - ``backend``: the adapter it works on;
    - ``step(entries, grads, lr)``: update every ``(path, Parameter)`` of ``entries`` with
      ``grads[path]`` (``grads`` may be ``None`` on a backend whose parameters carry ``.grad``);
    - ``state_dict(entries) -> {"<path>/<slot>": array}``, with ``"<path>/step"`` the update count;
    - ``load_state_dict(entries, state)``: ``state`` as ``{key: NumPy array}``, already checked by
      ``Optimizer.load_state_dict`` (keys, shapes, dtypes); an empty mapping resets the state. It must not
      fail half-way.

A room publishes new parameter values only through ``Parameter.set_value`` and never invalidates an array
the user may still hold.
"""

from __future__ import annotations

import sys

__all__ = ["state_keys", "pack_state", "call", "map_inputs", "input_leaves", "carry_out", "carry_in", "Grouping"]


def only_held_by(holders: int, obj) -> bool:
    """Whether ``holders`` known references (containers, attributes) and the caller's one local name are all
    that refer to ``obj``: then nobody else can see it, and a room may reuse or donate it. Judged by the
    reference count, against the count this same call sees for an object of one known holder, measured at
    import (Pythons count differently: 3.14 borrows references on the stack); False for everything where
    one more holder does not show in the count."""
    return _EXTRA_REFS is not None and _refcount(obj) == holders + _EXTRA_REFS


def _refcount(obj) -> int:
    return sys.getrefcount(obj)


def _probe(obj) -> int:  # the same call depth as only_held_by -> _refcount
    return _refcount(obj)


def _extra_refs() -> int | None:
    holder = [object()]
    obj = holder[0]
    extra = _probe(obj) - 1  # the count of one holder, less that holder: obj, the parameters, the argument
    holder.append(obj)
    return extra if _probe(obj) == extra + 2 else None


_EXTRA_REFS = _extra_refs()


def call(model, x):
    """``model`` on one batch of inputs: a tuple or list holds several positional inputs, a dict keyword
    inputs (``fit``'s several-input models, as in Keras), anything else is the one input."""
    t = type(x)
    if t is tuple or t is list:
        return model(*x)
    if t is dict:
        return model(**x)
    return model(x)


def map_inputs(f, x):
    """``f`` on the array ``x``, or on each array of a tuple, list or dict of inputs (same container back)."""
    if isinstance(x, dict):
        return {k: f(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(f(v) for v in x)
    return f(x)


def input_leaves(x) -> list:
    """The arrays of an input: ``x`` itself, or those of a tuple, list or dict of inputs (as ``map_inputs``)."""
    return list(x.values()) if isinstance(x, dict) else list(x) if isinstance(x, tuple | list) else [x]


def pack_state(states: dict, slots, step) -> dict:
    """An engine's ``state_dict``: ``{"<path>/<slot>": array, "<path>/step": step}`` in ``state_keys`` order,
    from ``{path: {slot: array}}`` (each room hands in copies of its own arrays and its own step scalar)."""
    out = {}
    for k, st in states.items():
        for s in slots:
            out[f"{k}/{s}"] = st[s]
        out[f"{k}/step"] = step
    return out


def state_keys(names, slots) -> list:
    """Every key of an optimizer state: ``"<path>/<slot>"`` per slot, then ``"<path>/step"``."""
    return [f"{k}/{s}" for k in names for s in (*slots, "step")]


def carry_out(carried: list, targets: dict) -> dict:
    """The traced values of the attributes forward assigned (``_swapped``'s ``carry``), keyed so that the
    caller of the compiled function finds their modules in ``targets`` (filled while tracing)."""
    out = {}
    for m, name, value in carried:
        key = f"{id(m)}.{name}"
        targets[key] = (m, name)
        out[key] = value
    return out


def carry_in(attrs: dict, targets: dict) -> None:
    """Set the concrete values a compiled call returned for the attributes its forward assigned (the last
    assignment wins, as in an eager call)."""
    for key, value in attrs.items():
        m, name = targets[key]
        m.__dict__[name] = value


class Grouping:
    """How many steps a compiled room runs per call in ``fit``, chosen from measurements, not a constant: the
    first 4 single steps are timed (the first includes the compilation); below ``fast`` seconds a step,
    ``group`` steps per call (the Python and dispatch around each call are a large share of such a step);
    from ``slow`` on, one; in between, one until a call of ``group`` steps, compiled beforehand, has been
    timed against them (XLA runs some ops, convolutions above all, several times slower inside a loop)."""

    def __init__(self, group: int, fast: float, slow: float):
        self.group, self.fast, self.slow = group, fast, slow
        self.k = None  # None while the first steps are timed
        self.trial = False  # whether a grouped call is still to be timed
        self.times: list = []
        self.one = None  # the time of one step

    def single(self, seconds: float) -> None:
        """Record the time of one single step (while ``k`` is None)."""
        self.times.append(seconds)
        if len(self.times) >= 4:
            self.one = sorted(self.times[1:])[1]
            self.k = self.group if self.one < self.fast else 1
            self.trial = self.fast <= self.one < self.slow

    def grouped(self, seconds: float) -> None:
        """Record the time of one call of ``group`` steps: group from now on if it beats single steps."""
        self.trial = False
        self.k = self.group if seconds / self.group < 0.98 * self.one else 1
