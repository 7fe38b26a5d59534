"""The training loop: ``fit``, ``evaluate``, ``predict``, a ``History``, and callbacks with named events.

One train step (forward, gradient, update) comes from the training room of the model's backend
(``lamina.training.trainer_for``): on jax it is a single ``jax.jit`` program, compiled once per batch
shape; on torch it runs eagerly, or through ``torch.compile`` with ``compile=True``. This file only feeds
it batches and keeps the books; it knows no backend by name.

>>> import lamina as lm, numpy as np
>>> lm.set_backend("numpy"); net = lm.Linear(1)
<lamina backend 'numpy'>
>>> lm.fit(net, lm.losses.mse, lm.optim.SGD(net), (np.zeros((4, 2)), np.zeros((4, 1))))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
lamina.errors.BackendError: the numpy backend cannot train (it has no automatic differentiation); ...
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable

import numpy as np

from . import context
from .backends import backend_of, get_backend
from .errors import few_names
from .functional import _python_values
from .module import Module
from .training import active_group, trainer_for
from .training.base import input_leaves
from .training.base import map_inputs as _map

__all__ = ["fit", "evaluate", "predict", "compile", "History", "Callback", "EarlyStopping", "Checkpoint"]

Loss = Callable[..., object]


# ----- batches ------------------------------------------------------------------------------------
def _is_arrays(x) -> bool:
    """An array, or a non-empty tuple, list or dict of arrays (a model's several inputs)."""
    if hasattr(x, "shape"):
        return True
    items = x.values() if isinstance(x, dict) else x if isinstance(x, tuple | list) else ()
    return bool(items) and all(hasattr(a, "shape") for a in items)


def _rows(x) -> int:
    """The leading (batch) axis of an input, or of the first of several inputs."""
    return int(input_leaves(x)[0].shape[0]) if not hasattr(x, "shape") else int(x.shape[0])


def _array_pair(data):
    """``(x, y)`` if ``data`` is arrays (``x`` may be a tuple or dict of arrays), else None: an iterable of
    batches. A tuple of two batches ``((x1, y1), (x2, y2))`` is batches: its second item is no array."""
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[1], "shape") and _is_arrays(data[0]):
        x, y = data
        n = int(y.shape[0])
        for i, a in enumerate(input_leaves(x)):
            if int(a.shape[0]) != n:
                where = "inputs" if hasattr(x, "shape") else f"input {list(x)[i] if isinstance(x, dict) else i}"
                raise ValueError(f"{where} have {a.shape[0]} rows but the targets have {n}; every input array "
                                 "and the targets need the same leading (batch) axis")
        return x, y
    return None


class _Arrays:
    """``(X, Y)`` arrays cut into batches of ``batch_size`` rows (in ``order``, a permutation, when
    shuffled): iterating yields ``(x, y)`` batches; a train step that offers ``epoch`` takes them whole."""

    def __init__(self, x, y, batch_size: int, order):
        self.x, self.y, self.batch_size, self.order = x, y, batch_size, order

    def __len__(self) -> int:
        return math.ceil(int(self.y.shape[0]) / self.batch_size)

    def __iter__(self):
        x, y, bs, n = self.x, self.y, self.batch_size, int(self.y.shape[0])
        if self.order is None:  # contiguous slices: no index arrays, no gather
            for start in range(0, n, bs):
                rows = slice(start, start + bs)
                yield _map(lambda a, rows=rows: a[rows], x), y[rows]
            return
        for start in range(0, n, bs):
            idx = self.order[start:start + bs]
            yield _take(x, idx), _take(y, idx)


def _batches(data, batch_size: int, shuffle: bool, rng: np.random.Generator | None):
    """``(x, y)`` batches of ``(X, Y)`` arrays (an ``_Arrays``), or any iterable of batches as it is."""
    pair = _array_pair(data)
    if pair is None:
        return data
    x, y = pair
    return _Arrays(x, y, batch_size, rng.permutation(int(y.shape[0])) if shuffle else None)


def _take(a, idx):
    """Rows ``idx`` (host integers) of an array, or of each array of several inputs."""
    if not hasattr(a, "shape"):
        return _map(lambda v: _take(v, idx), a)
    b = backend_of(a)
    if b is None:
        return np.asarray(a)[idx]
    return b.xp.take(a, b.from_numpy(idx, b.device_of(a)), axis=0)


def _no_rows(who: str, data: str = "the data", why: str = "there is no mean loss or metric to report") -> ValueError:
    """The error for data with no rows, one wording for ``fit`` and ``evaluate``."""
    return ValueError(f"{who}: {data} has no rows (0 batches), so {why}; pass at least one (x, y) batch")


def _known_empty(data) -> bool:
    """Whether ``data`` (``(X, Y)`` arrays or an iterable of batches) is known to hold no rows before it is
    run: arrays with 0 rows, or batches whose ``len`` is 0. A generator's are known only once it has run."""
    pair = _array_pair(data)
    if pair is not None:
        return int(pair[1].shape[0]) == 0
    return _len_or_none(data) == 0


def _n_batches(data, batch_size):
    pair = _array_pair(data)
    if pair is not None:
        return math.ceil(int(pair[1].shape[0]) / batch_size)
    return _len_or_none(data)


def _len_or_none(data) -> int | None:
    """``len(data)``, or None where it is not known (no ``__len__``, or one that raises TypeError, as a
    ``tf.data.Dataset`` of unknown cardinality does)."""
    try:
        return len(data) if hasattr(data, "__len__") else None
    except TypeError:
        return None


def _build(model: Module, xb) -> None:
    """Build a lazy model on its first batch (so the optimizer sees every parameter from the start)."""
    if isinstance(xb, dict):
        model.ensure_built(**xb)
    elif isinstance(xb, tuple | list):
        model.ensure_built(*xb)
    else:
        model.ensure_built(xb)


def _execute(model: Module, step, k: int | None, batches, optimizer, convert, sync: bool = False,
             each: bool = True, after_build=None):
    """Run the train step over ``batches``. Yields ``(loss, outputs, rows per batch, batches done, targets)``.

    With ``k > 1`` (a step that offers ``step.many``), every ``k`` consecutive batches of one shape run as
    one call, and ``loss`` is then the vector of their ``k`` losses; the rest run one by one. ``k=None``
    lets the step choose (``step.group``: it measures its first steps). Over arrays, a step that offers
    ``step.epoch`` runs the whole epoch itself (the data on the device once); ``sync``: something reads
    the model after each batch (a batch callback), so the step publishes its values after each call;
    ``each=False``: nothing reads a step's figures or the model between steps, so the epoch may run several
    calls back to back and yield them as one item whose ``loss`` is the list of their losses.
    ``after_build``: called once the model is built on the first batch, before any step.
    """
    epoch = getattr(step, "epoch", None)
    if epoch is not None and isinstance(batches, _Arrays):
        if int(batches.y.shape[0]):
            _build(model, convert(_map(lambda a: a[:batches.batch_size], batches.x)))
            if after_build is not None:
                after_build()
        run = epoch(batches.x, batches.y, batches.order, batches.batch_size, k, optimizer.lr_at,
                    optimizer.steps, sync, each)
        if run is not None:
            for item in run:
                optimizer.steps += item[3]
                yield item
            return
    group: list = []
    many = step.many
    choose = getattr(step, "group", None) if k is None else None
    lr_at = optimizer.lr_at

    for i, (xb, yb) in enumerate(batches):
        xb, yb = convert(xb), convert(yb)
        if i == 0:
            _build(model, xb)
            if after_build is not None:
                after_build()
        kk = choose(xb) if choose is not None else (k or 1)
        if kk == 1 and not group:
            loss, out = step(xb, yb, lr_at(optimizer.steps))
            optimizer.steps += 1
            yield loss, out, _rows(xb), 1, yb
            continue
        group.append((xb, yb))
        if len(group) < kk:
            continue
        if len({(tuple(input_leaves(x)[0].shape), tuple(y.shape)) for x, y in group}) == 1 and hasattr(xb, "shape"):
            xs, ys = _stack(model, [x for x, _ in group]), _stack(model, [y for _, y in group])
            losses = many(xs, ys, [lr_at(optimizer.steps + j) for j in range(kk)])
            optimizer.steps += kk
            yield losses, None, _rows(group[0][0]), kk, None
        else:
            for xb2, yb2 in group:
                loss, out = step(xb2, yb2, lr_at(optimizer.steps))
                optimizer.steps += 1
                yield loss, out, _rows(xb2), 1, yb2
        group = []
    for xb, yb in group:
        loss, out = step(xb, yb, lr_at(optimizer.steps))
        optimizer.steps += 1
        yield loss, out, _rows(xb), 1, yb


def _loss_sum(backend, pending: list) -> float:
    """The sum of ``loss * rows`` over ``(loss, rows)`` pairs (a loss: a scalar, a vector of a group of
    steps, or a list of those), read back to the host. Each is read on its own: stacking them on the device
    first costs more (jax: ~4 us per scalar for ``jnp.stack``, ~2 us per ``to_numpy``)."""
    to_numpy = backend.to_numpy
    total = 0.0
    for vs, n in pending:
        values = [to_numpy(v) for v in vs] if isinstance(vs, list) else [to_numpy(vs)]
        try:
            total += float(np.sum(np.array(values, np.float64))) * n  # scalars alike, or vectors of one length
        except ValueError:  # scalars and group vectors mixed
            total += sum(float(np.sum(v, dtype=np.float64)) for v in values) * n
    return total


def _stack(model: Module, arrays: list):
    if all(type(a) is np.ndarray for a in arrays):  # stacked on the host: one transfer for the group
        return np.stack(arrays)
    return get_backend(model.backend).xp.stack(arrays)


def _converter(model: Module):
    """``convert(a)``: a batch as an array of the model's backend. A NumPy batch that ``_batches`` cut is
    converted without a second copy; anything else goes through the model's own input conversion."""
    b = get_backend(model.backend)
    device = model.device

    def convert(a):
        if type(a) is np.ndarray and a.dtype.kind in "biuf":
            if a.dtype == np.float64:
                a = a.astype(np.float32)
            return b.from_numpy(a, device, copy=not a.flags.owndata)
        if isinstance(a, tuple | list | dict) and _is_arrays(a):  # several inputs
            return _map(convert, a)
        return _to_model(model, a)

    return convert


def _to_model(model: Module, a):
    return model.convert_inputs(a)[0]


def _float(x) -> float:
    b = backend_of(x)
    return float(b.to_numpy(x)) if b is not None else float(x)


def _metric_name(m) -> str:
    return getattr(m, "__name__", type(m).__name__)


# ----- history and callbacks ----------------------------------------------------------------------
class History:
    """Per-epoch figures: ``history.history["loss"]``, ``["val_accuracy"]``, ..., one value per epoch."""

    def __init__(self):
        self.history: dict[str, list[float]] = {}
        self.epochs: list[int] = []

    def record(self, epoch: int, logs: dict) -> None:
        """Append one epoch's figures."""
        self.epochs.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(v)

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    def plot(self, path, title: str = "Training") -> None:
        """Write a PNG with one panel for the losses and one for the other metrics, per epoch."""
        try:
            import matplotlib
        except ImportError as e:
            raise ImportError("History.plot needs matplotlib: pip install 'lamina[plot]'") from e

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        losses = [k for k in self.history if k.endswith("loss")]
        others = [k for k in self.history if k not in losses]
        fig, axes = plt.subplots(1, 2 if others else 1, figsize=(10 if others else 5, 3.6), squeeze=False)
        epochs = [e + 1 for e in self.epochs]
        for ax, keys, label in ((axes[0][0], losses, "loss"), *(((axes[0][1], others, "metric"),) if others else ())):
            for k in keys:
                ax.plot(epochs, self.history[k], marker="o", label=k)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


class Callback:
    """Subclass and override any of the events; ``self.trainer`` is set before training begins (it has
    ``model``, ``optimizer``, ``history`` and ``stop``: set ``trainer.stop = True`` to end training)."""

    trainer = None

    def on_train_begin(self, logs: dict) -> None:
        """Before the first epoch."""

    def on_epoch_begin(self, epoch: int, logs: dict) -> None:
        """Before each epoch (counted from 0)."""

    def on_batch_end(self, batch: int, logs: dict) -> None:
        """After each training step, with that batch's ``loss`` (and metrics)."""

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        """After each epoch, with its mean figures (``val_*`` included)."""

    def on_train_end(self, logs: dict) -> None:
        """After the last epoch, with the whole history."""


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs; with
    ``restore_best=True`` the model gets back the values of its best epoch."""

    def __init__(self, monitor: str = "val_loss", patience: int = 3, min_delta: float = 0.0, mode: str = "min",
                 restore_best: bool = True):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, min_delta, mode
        self.restore_best = restore_best
        self.best, self.wait, self.best_epoch, self._best_values = None, 0, None, None

    def on_epoch_end(self, epoch, logs):
        """Track the best value; ask to stop after ``patience`` epochs without improvement."""
        if self.monitor not in logs:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r} but the epoch logs have {sorted(logs)}")
        value = logs[self.monitor] * (1 if self.mode == "min" else -1)
        if self.best is None or value < self.best - self.min_delta:
            self.best, self.wait, self.best_epoch = value, 0, epoch
            if self.restore_best:
                model = self.trainer.model
                self._best_values = {k: get_backend(model.backend).copy(v) for k, v in model.state_dict().items()}
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.trainer.stop = True

    def on_train_end(self, logs):
        """Give the model back the values of its best epoch (``restore_best``)."""
        if self.restore_best and self._best_values is not None and self.best_epoch != self.trainer.epoch:
            self.trainer.model.load_state_dict(self._best_values)


class Checkpoint(Callback):
    """Save the model (and optimizer state) through ``lm.save`` at the end of each epoch.

    ``path`` may contain ``{epoch}`` (counted from 1) and any logged figure, e.g.
    ``"ckpt-{epoch:02d}-{val_loss:.3f}.safetensors"``; ``save_best_only`` with ``monitor``/``mode`` keeps
    only improvements."""

    def __init__(self, path: str, monitor: str | None = None, mode: str = "min", save_best_only: bool = False):
        self.path, self.monitor, self.mode, self.save_best_only = str(path), monitor, mode, save_best_only
        self.best = None
        self.saved: list[str] = []

    def on_epoch_end(self, epoch, logs):
        """Save the model and the optimizer state (unless ``save_best_only`` and no improvement)."""
        from .checkpoint import save

        if self.save_best_only:
            value = logs[self.monitor] * (1 if self.mode == "min" else -1)
            if self.best is not None and value >= self.best:
                return
            self.best = value
        path = self.path.format(epoch=epoch + 1, **logs)
        if not getattr(self.trainer, "is_main", True):  # data-parallel: rank 0 writes, the others have the same
            self.saved.append(path)
            return
        save(self.trainer.model, path, optimizer=self.trainer.optimizer, durable=False)
        self.saved.append(path)


class _Trainer:
    def __init__(self, model, optimizer, history):
        self.model, self.optimizer, self.history = model, optimizer, history
        self.stop = False
        self.epoch = -1


#: how many train steps an optimizer keeps (``optimizer.step_cache``), the most recently used: a new loss
#: object per fit call (a lambda) would otherwise grow the cache, and its compiled programs, forever
STEP_CACHE_SIZE = 4


def _train_step(model: Module, loss: Loss, optimizer, compile, outputs: bool):
    """The backend's train step for this model, loss, optimizer and compile choice, built once and kept
    with the optimizer, so that calling fit again (or once per epoch) does not compile again. The cache
    keeps the ``STEP_CACHE_SIZE`` most recently used steps."""
    cache = optimizer.step_cache
    key = (id(model), model.backend, loss, compile, outputs)
    hit = cache.pop(key, None)
    if hit is None or hit[0]() is not model:
        hit = (weakref.ref(model),
               trainer_for(get_backend(model.backend)).make_step(model, loss, optimizer, compile, outputs))
    cache[key] = hit  # (re)inserted last: the most recently used
    while len(cache) > STEP_CACHE_SIZE:
        del cache[next(iter(cache))]
    return hit[1]


def _check_optimizer(model: Module, optimizer, built: bool = False) -> bool:
    """Refuse an optimizer made for other parameters than ``model``'s (one made for an earlier copy of the
    model, a notebook cell run again): ``fit`` would otherwise train nothing (torch, tensorflow) or fail inside
    the compiled step (jax).

    The rule: at least one of the optimizer's trainable parameters is one of the model's (the same object), or
    belongs to no module at all. Not "each of them": an optimizer over a part of the model
    (``lm.optim.Adam(model.head)``, the rest left as it is) is the ordinary way to train a part; and a free
    parameter (a learnable temperature inside the loss, the model frozen: temperature scaling) is not another
    model's, and trains on torch and tensorflow. An optimizer without trainable parameters is judged only once
    the model is built (``built``): a lazy model's ``build`` may make them. Returns whether it has judged
    (False: call again with ``built=True`` after the model's first build)."""
    entries = optimizer.entries()
    own = {id(p) for p in model.parameters()}
    if any(id(p) in own or p.owner is None for _, p in entries):
        return True
    name = type(optimizer).__name__
    fix = (f"create the optimizer for the model you train: lm.optim.{name}(model), or lm.optim.{name}(model.part) "
           "to train a part of it")
    if entries:
        raise ValueError(f"fit: the optimizer was made for other parameters: none of its parameters "
                         f"{few_names([k for k, _ in entries])} is one of the model being trained "
                         f"({type(model).__name__}), so fit would update nothing (an optimizer holds the parameter "
                         f"objects it was made for, not their names: one made for an earlier copy of the model "
                         f"does not follow a new one); {fix}")
    if built and any(p.trainable for p in model.parameters()):
        raise ValueError(f"fit: the optimizer has no trainable parameters, so it would update none of the model's "
                         f"(it was made for another model, not built yet, or for frozen parameters only); {fix}")
    return built


# ----- several processes or devices (lamina.distributed) ------------------------------------------
def _parallel_plan(model: Module, parallel):
    if parallel is None and not _distributed_may_apply():
        return None
    from .distributed import plan_for

    return plan_for(model, parallel)


def _distributed_may_apply() -> bool:
    """Whether this process is one of several (a process group is up); imports no backend."""
    return active_group() is not None


def _epoch(plan, data, batch_size: int, shuffle: bool, rng):
    if plan is None:
        return _batches(data, batch_size, shuffle, rng)
    return plan.batches(data, batch_size, shuffle, rng, _take)


def _reduce_totals(plan, totals: dict, seen: int):
    keys = list(totals)
    vec = plan.reduce([seen, *(totals[k] for k in keys)])
    return {k: float(vec[i + 1]) for i, k in enumerate(keys)}, float(vec[0])


def _validate(plan, model: Module, loss, data, metrics, batch_size: int) -> dict:
    if plan is None:
        return evaluate(model, loss, data, metrics=metrics, batch_size=batch_size)
    return plan.evaluate(evaluate, model, loss, data, metrics, batch_size)


# ----- the loop -----------------------------------------------------------------------------------
class _NoBar:
    """The bar when none is shown: tqdm's calls that ``fit`` makes, doing nothing (a disabled ``tqdm`` costs
    ~40 us to create, per epoch)."""

    disable = True

    def update(self, n=1):
        return False

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


_NO_BAR = _NoBar()


def fit(model: Module, loss: Loss, optimizer, train_data, *, epochs: int = 1, batch_size: int = 32,
        validation_data=None, metrics: Iterable = (), callbacks: Iterable[Callback] = (), shuffle: bool = True,
        seed: int | None = 0, progress: bool | None = None, compile: bool | None = None,
        steps_per_call: int | None = None, parallel=None) -> History:
    """Train ``model`` to minimize ``loss(outputs, targets)`` with ``optimizer``.

    ``train_data``: ``(X, Y)`` arrays (NumPy or the backend's), cut into batches of ``batch_size`` and
    shuffled each epoch from ``seed`` when ``shuffle``; or any iterable of ``(x, y)`` batches, used as
    given. ``validation_data``: the same forms, evaluated after each epoch (logged as ``val_*``).
    ``metrics``: functions ``metric(outputs, targets)`` such as ``lm.losses.accuracy``.
    ``progress``: a tqdm bar with the running loss and metrics; ``None`` shows it only on a terminal.
    Training runs in training mode; afterwards every module is back in the mode it had.
    ``compile``: jax always compiles the step unless ``False``; torch runs eagerly unless ``True``
    (``torch.compile``). ``steps_per_call``: how many steps to run as one compiled call where the backend
    can (jax); by default the step measures its first calls and groups 16 per call only where a step is
    fast enough for the Python around it to matter (small models). Per-step losses, callbacks and the bar
    still see every step, and each step's update is the same.
    ``parallel``: an ``lm.distributed.DataParallel`` (jax: shard the batch over devices, optionally the
    parameters too); under ``torchrun`` (a torch process group) ``fit`` trains data-parallel by itself, with
    ``batch_size`` per rank (see ``lamina.distributed``). Returns the ``History``.
    Training data with no rows is a ``ValueError`` (as in ``evaluate``), and so is an optimizer made for
    another model's parameters (one over a part of ``model`` trains that part); both before anything runs. An
    iterator that runs out after the first epoch stops training with a ``RuntimeWarning``, as in Keras.
    """
    from tqdm.auto import tqdm

    if optimizer is None or not hasattr(optimizer, "engine"):
        raise TypeError(f"fit needs an lm.optim optimizer, e.g. lm.optim.Adam(model), got {optimizer!r}")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"fit: epochs must be a non-negative int, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"fit: batch_size must be a positive int, got {batch_size!r}")
    # Data with no rows, and an optimizer made for another model, are refused before anything changes (no
    # callback runs, no step is counted); a generator is known to be empty only after its first epoch.
    if _known_empty(train_data):
        raise _no_rows("fit", "the training data", "there is nothing to train on and no loss to report")
    if validation_data is not None and _known_empty(validation_data):
        raise _no_rows("fit", "the validation data")
    after_build = None if _check_optimizer(model, optimizer) else lambda: _check_optimizer(model, optimizer, True)
    metrics = list(metrics)
    history = History()
    trainer = _Trainer(model, optimizer, history)
    callbacks = list(callbacks)
    for cb in callbacks:
        cb.trainer = trainer
    plan = _parallel_plan(model, parallel)
    rng = np.random.default_rng(plan.seed(seed) if plan is not None else seed)
    step = _train_step(model, loss, optimizer, compile, outputs=bool(metrics))
    if plan is not None:
        step = plan.wrap(step, model, loss, optimizer, compile, bool(metrics))
    trainer.is_main = plan is None or plan.is_main
    user_batch_end = any(type(cb).on_batch_end is not Callback.on_batch_end for cb in callbacks)
    if getattr(step, "many", None) is None or metrics or user_batch_end:  # a batch callback sees each step
        k = 1
    else:
        k = steps_per_call  # None: the step chooses from a measurement of its first calls
    forget = getattr(step, "forget", None)  # the step may not donate what the user could hold from now on
    if forget is not None:
        forget()
    convert = getattr(step, "convert", None) or _converter(model)
    backend = get_backend(model.backend)
    for cb in callbacks:
        cb.on_train_begin({})
    # a Ctrl-C waits until a step's books agree (its values published, counted by the engine and opt.steps);
    # callbacks and validation, the user's code, stay interruptible (context.interrupts_deferred)
    with model.mode(True), context.interrupts_deferred():
        for epoch in range(epochs):
            trainer.epoch = epoch
            with context.interruptible():
                for cb in callbacks:
                    cb.on_epoch_begin(epoch, {})
            totals = {"loss": 0.0, **{_metric_name(m): 0.0 for m in metrics}}
            seen = 0
            shown = (sys.stderr.isatty() if progress is None else progress) and trainer.is_main
            bar = tqdm(total=_n_batches(train_data, batch_size) if plan is None else plan.n_batches(
                           train_data, batch_size), desc=f"epoch {epoch + 1}/{epochs}", leave=True,
                       dynamic_ncols=True) if shown else _NO_BAR
            # Each step's figures are read back from the device only when something uses them (a metric, a
            # batch callback); otherwise the losses are read when the bar shows them (about every 0.1 s) or
            # once at the end of the epoch, so the host rarely waits for the device between steps.
            each = bool(metrics) or user_batch_end
            pending, batch = [], 0
            epoch_batches = _epoch(plan, train_data, batch_size, shuffle, rng)
            items = _execute(model, step, k, epoch_batches, optimizer, convert, sync=user_batch_end, each=each,
                             after_build=after_build if epoch == 0 else None)
            try:  # (closed here, while a Ctrl-C waits: the epoch's own finally publishes the model's values)
                for loss_value, out, n, done, yb in items:
                    context.interruption_point()  # the step is counted, its values held: a Ctrl-C may land
                    seen += n * done
                    drew = bar.update(done)
                    if not each:
                        pending.append((loss_value, n))
                        if drew:  # the bar has just drawn itself (tqdm does about every 0.1 s): its next loss
                            totals["loss"] += _loss_sum(backend, pending)
                            pending.clear()
                            bar.set_postfix({"loss": f"{totals['loss'] / seen:.4f}"}, refresh=False)
                        continue
                    for value in np.asarray(backend.to_numpy(loss_value), np.float64).reshape(-1):
                        logs = {"loss": float(value)}
                        for m in metrics:  # (metrics run one batch per call: done == 1)
                            logs[_metric_name(m)] = _float(m(out, yb))
                        for key, v in logs.items():
                            totals[key] += v * n
                        if callbacks:
                            with context.interruptible():
                                for cb in callbacks:
                                    cb.on_batch_end(batch, logs)
                        batch += 1
                    if user_batch_end and forget is not None:
                        forget()
                    if not bar.disable:
                        bar.set_postfix({key: f"{totals[key] / seen:.4f}" for key in totals}, refresh=False)
            finally:
                items.close()
            if plan is not None:
                plan.end_epoch()
            if pending:
                totals["loss"] += _loss_sum(backend, pending)
                if not bar.disable:
                    bar.set_postfix({"loss": f"{totals['loss'] / max(seen, 1):.4f}"}, refresh=False)
            bar.close()
            if plan is not None:
                totals, seen = _reduce_totals(plan, totals, seen)
            if seen == 0:  # an iterable of batches that gave no rows (a generator: known only now)
                if epoch == 0:
                    raise _no_rows("fit", "the training data", "there is nothing to train on and no loss to report")
                # as Keras: a generator or iterator is used up by one epoch; stop rather than log a loss of nothing
                warnings.warn(f"fit: the training data ran out: epoch {epoch + 1} got no batches (an iterator or "
                              f"generator is used up by one epoch), so training stops after epoch {epoch}; to train "
                              "several epochs, pass a list of batches, an object that can be iterated again, or "
                              "(X, Y) arrays", RuntimeWarning, stacklevel=2)
                trainer.epoch = epoch - 1  # the last epoch trained, as callbacks' on_train_end expects
                break
            logs = {k: v / seen for k, v in totals.items()}
            with context.interruptible():
                if validation_data is not None:
                    logs.update({f"val_{k}": v for k, v in _validate(plan, model, loss, validation_data, metrics,
                                                                      batch_size).items()})
                history.record(epoch, logs)
                for cb in callbacks:
                    cb.on_epoch_end(epoch, logs)
            if forget is not None:
                forget()
            if plan is not None and plan.world > 1:  # every rank stops together
                trainer.stop = plan.any(trainer.stop)
            if trainer.stop:
                break
    for cb in callbacks:
        cb.on_train_end(history.history)
    return history


def evaluate(model: Module, loss: Loss | None, data, *, metrics: Iterable = (), batch_size: int = 256) -> dict:
    """Mean ``loss`` and metrics of ``model`` over ``data`` (same forms as ``fit``: ``(X, Y)`` arrays, ``X``
    possibly a tuple or dict of several inputs, or an iterable of ``(x, y)`` batches), in eval mode, without
    gradients (each module's mode is restored afterwards); on jax the forward runs compiled (one program per
    batch shape, see ``lm.compile``). Returns ``{"loss": ..., "<metric>": ...}``. Data with no rows is a
    ``ValueError`` (a mean over nothing has no value).

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); net = lm.Linear(2, 1)
    <lamina backend 'numpy'>
    >>> lm.evaluate(net, lm.losses.mse, (np.zeros((0, 2)), np.zeros((0, 1))))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: evaluate: the data has no rows (0 batches), so there is no mean loss or metric to report; ...
    """
    metrics = list(metrics)
    totals = {**({"loss": 0.0} if loss is not None else {}), **{_metric_name(m): 0.0 for m in metrics}}
    seen = 0
    forward = _inference(model)
    with model.mode(False), get_backend(model.backend).no_grad():
        for xb, yb in _batches(data, batch_size, False, None):
            xb, yb = _to_model(model, xb), _to_model(model, yb)
            n = _rows(xb)
            if n == 0:
                continue
            out = _call(forward, xb)
            seen += n
            if loss is not None:
                totals["loss"] += _float(loss(out, yb)) * n
            for m in metrics:
                totals[_metric_name(m)] += _float(m(out, yb)) * n
    if seen == 0:
        raise _no_rows("evaluate")
    return {k: v / seen for k, v in totals.items()}


def predict(model: Module, data, batch_size: int = 256):
    """``model``'s outputs for ``data``, computed in batches in eval mode without gradients and joined
    along the first axis. ``data``: an array; a tuple or dict of arrays with a common leading axis (a model
    with several inputs: ``forward(x1, x2)`` or ``forward(a=..., b=...)``); or an iterable (a list, a
    generator) of input batches, each an array or a tuple or dict of them. On jax the forward runs compiled
    (one program per batch shape, see ``lm.compile``).

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); net = lm.Linear(2, 1)
    <lamina backend 'numpy'>
    >>> lm.predict(net, np.zeros((5, 2))).shape
    (5, 1)
    """
    b = get_backend(model.backend)
    if hasattr(data, "shape") or (isinstance(data, tuple | dict) and _is_arrays(data)):
        n = _rows(data)
        if n == 0:  # no rows: the model itself (eagerly) gives the empty output of the right shape
            with model.mode(False), b.no_grad():
                return _call(model, _to_model(model, data))
        data = [_map(lambda a, i=i: a[i:i + batch_size], data) for i in range(0, n, batch_size)]
    forward = _inference(model)
    with model.mode(False), b.no_grad():
        outs = [_call(forward, _to_model(model, xb)) for xb in data]
    if not outs:
        raise ValueError("predict: the data has no batches, so there is no output shape to return; pass an "
                         "array (an empty one gives an empty output) or at least one batch")
    return b.xp.concat(outs, axis=0)


def compile(model: Module):
    """A compiled forward of ``model``: ``fast = lm.compile(model)``, then ``fast(x)`` computes ``model(x)``.

    On jax, one ``jax.jit`` program per input shape (and mode), cached, with the model's current parameters
    passed as arguments: a later update of the weights (training, ``load_state_dict``) is seen without
    compiling again, and nothing the caller holds is donated. On torch, ``torch.compile`` (it reads the
    parameters on each call too; on CPU it pays only for large models). On a backend without a compiler
    (numpy) it returns ``model`` itself. Inputs are converted as ``model(x)`` converts them; Python
    numbers among the arguments become traced values on jax. Arrays that forward assigns to attributes
    (``self.attention_weights = w``) hold the last call's values, as after an eager call. Plain Python
    attributes of the modules (``self.k = 5.0``) are read when the program is traced, as with ``jax.jit``:
    after changing one, call ``lm.compile(model)`` again (``lm.predict`` and ``lm.evaluate`` notice such a
    change themselves and compile again).

    >>> import lamina as lm, numpy as np
    >>> lm.set_backend("numpy"); net = lm.Linear(2, 1)
    <lamina backend 'numpy'>
    >>> lm.compile(net) is net
    True
    """
    make = getattr(_room(model), "make_forward", None)
    return model if make is None else make(model)


def _room(model: Module):
    """The training room of ``model``'s backend, or None for a backend that cannot train (numpy)."""
    from .errors import BackendError

    try:
        return trainer_for(get_backend(model.backend))
    except BackendError:
        return None


#: model -> (backend, Python attributes, compiled forward): the forward that evaluate and predict use on a
#: backend that compiles inference; it lives as long as the model (weak keys), one per model
_INFERENCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _inference(model: Module):
    """The forward that ``evaluate`` and ``predict`` use: compiled where the backend's room says that
    compiling pays for inference (``COMPILE_INFERENCE``: jax), built once per model and per state of its
    Python attributes (read once per call of evaluate or predict); else the model."""
    room = _room(model)
    if not getattr(room, "COMPILE_INFERENCE", False):
        return model
    values = _python_values([m.__dict__ for m in model.modules()])
    hit = _INFERENCE.get(model)
    if hit is None or hit[0] != model.backend or hit[1] != values:
        hit = _INFERENCE[model] = (model.backend, values, room.make_forward(model))
    return hit[2]


def _call(forward, x):
    """``forward`` on one batch: a tuple or list holds several inputs, a dict keyword inputs."""
    if isinstance(x, tuple | list):
        return forward(*x)
    if isinstance(x, dict):
        return forward(**x)
    return forward(x)
