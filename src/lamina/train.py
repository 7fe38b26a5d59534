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
import weakref
from collections.abc import Callable, Iterable

import numpy as np

from .backends import backend_of, get_backend
from .module import Module
from .training import trainer_for

__all__ = ["fit", "evaluate", "predict", "History", "Callback", "EarlyStopping", "Checkpoint"]

Loss = Callable[..., object]


# ----- batches ------------------------------------------------------------------------------------
def _batches(data, batch_size: int, shuffle: bool, rng: np.random.Generator | None):
    """Yield (x, y) batches from (X, Y) arrays, or pass through any iterable of (x, y) batches."""
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
        x, y = data
        n = x.shape[0]
        if y.shape[0] != n:
            raise ValueError(f"inputs have {n} rows but targets have {y.shape[0]}")
        if not shuffle:  # contiguous slices: no index arrays, no gather
            for start in range(0, n, batch_size):
                yield x[start:start + batch_size], y[start:start + batch_size]
            return
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield _take(x, idx), _take(y, idx)
    else:
        yield from data


def _take(a, idx):
    b = backend_of(a)
    if b is None:
        return np.asarray(a)[idx]
    return b.xp.take(a, b.from_numpy(idx, b.device_of(a)), axis=0)


def _n_batches(data, batch_size):
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
        return math.ceil(data[0].shape[0] / batch_size)
    return len(data) if hasattr(data, "__len__") else None


def _execute(model: Module, step, k: int | None, batches, optimizer, convert):
    """Run the train step over ``batches``. Yields ``(loss, outputs, rows per batch, batches done, targets)``.

    With ``k > 1`` (a step that offers ``step.many``), every ``k`` consecutive batches of one shape run as
    one call, and ``loss`` is then the vector of their ``k`` losses; the rest run one by one. ``k=None``
    lets the step choose (``step.group``: it measures its first steps).
    """
    group: list = []
    many = step.many
    choose = getattr(step, "group", None) if k is None else None
    lr_at = optimizer.lr_at

    for i, (xb, yb) in enumerate(batches):
        xb, yb = convert(xb), convert(yb)
        if i == 0:
            model.ensure_built(xb)  # so the optimizer sees every parameter from the start
        kk = choose(xb) if choose is not None else (k or 1)
        if kk == 1 and not group:
            loss, out = step(xb, yb, lr_at(optimizer.steps))
            optimizer.steps += 1
            yield loss, out, xb.shape[0], 1, yb
            continue
        group.append((xb, yb))
        if len(group) < kk:
            continue
        if len({(tuple(x.shape), tuple(y.shape)) for x, y in group}) == 1:
            xs, ys = _stack(model, [x for x, _ in group]), _stack(model, [y for _, y in group])
            losses = many(xs, ys, [lr_at(optimizer.steps + j) for j in range(kk)])
            optimizer.steps += kk
            yield losses, None, group[0][0].shape[0], kk, None
        else:
            for xb2, yb2 in group:
                loss, out = step(xb2, yb2, lr_at(optimizer.steps))
                optimizer.steps += 1
                yield loss, out, xb2.shape[0], 1, yb2
        group = []
    for xb, yb in group:
        loss, out = step(xb, yb, lr_at(optimizer.steps))
        optimizer.steps += 1
        yield loss, out, xb.shape[0], 1, yb


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
        return _to_model(model, a)

    return convert


def _to_model(model: Module, a):
    return model._convert_inputs((a,))[0]


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
        save(self.trainer.model, path, optimizer=self.trainer.optimizer, durable=False)
        self.saved.append(path)


class _Trainer:
    def __init__(self, model, optimizer, history):
        self.model, self.optimizer, self.history = model, optimizer, history
        self.stop = False
        self.epoch = -1


def _train_step(model: Module, loss: Loss, optimizer, compile, outputs: bool):
    """The backend's train step for this model, loss, optimizer and compile choice, built once and kept
    with the optimizer, so that calling fit again (or once per epoch) does not compile again."""
    cache = optimizer.step_cache
    key = (id(model), model.backend, loss, compile, outputs)
    hit = cache.get(key)
    if hit is None or hit[0]() is not model:
        hit = cache[key] = (weakref.ref(model),
                            trainer_for(get_backend(model.backend)).make_step(model, loss, optimizer, compile, outputs))
    return hit[1]


# ----- the loop -----------------------------------------------------------------------------------
def fit(model: Module, loss: Loss, optimizer, train_data, *, epochs: int = 1, batch_size: int = 32,
        validation_data=None, metrics: Iterable = (), callbacks: Iterable[Callback] = (), shuffle: bool = True,
        seed: int | None = 0, progress: bool | None = None, compile: bool | None = None,
        steps_per_call: int | None = None) -> History:
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
    still see every step, and each step's update is the same. Returns the ``History``.
    """
    from tqdm.auto import tqdm

    if optimizer is None or not hasattr(optimizer, "engine"):
        raise TypeError(f"fit needs an lm.optim optimizer, e.g. lm.optim.Adam(model), got {optimizer!r}")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"fit: epochs must be a non-negative int, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"fit: batch_size must be a positive int, got {batch_size!r}")
    metrics = list(metrics)
    history = History()
    trainer = _Trainer(model, optimizer, history)
    callbacks = list(callbacks)
    for cb in callbacks:
        cb.trainer = trainer
    rng = np.random.default_rng(seed)
    step = _train_step(model, loss, optimizer, compile, outputs=bool(metrics))
    if getattr(step, "many", None) is None or metrics:
        k = 1
    else:
        k = steps_per_call  # None: the step chooses from a measurement of its first calls
    forget = getattr(step, "forget", None)  # the step may not donate what the user could hold from now on
    if forget is not None:
        forget()
    user_batch_end = any(type(cb).on_batch_end is not Callback.on_batch_end for cb in callbacks)
    convert = getattr(step, "convert", None) or _converter(model)
    backend = get_backend(model.backend)
    for cb in callbacks:
        cb.on_train_begin({})
    with model.mode(True):
        for epoch in range(epochs):
            trainer.epoch = epoch
            for cb in callbacks:
                cb.on_epoch_begin(epoch, {})
            totals = {"loss": 0.0, **{_metric_name(m): 0.0 for m in metrics}}
            seen = 0
            bar = tqdm(total=_n_batches(train_data, batch_size), desc=f"epoch {epoch + 1}/{epochs}",
                       disable=(not sys.stderr.isatty()) if progress is None else not progress, leave=True,
                       dynamic_ncols=True)
            # Per-batch figures are read back from the device only when something shows or uses them (the
            # bar, a metric, a batch callback); otherwise the losses are joined once at the end of the epoch,
            # so the host never waits for the device between steps.
            live = not bar.disable or bool(metrics) or user_batch_end
            pending, batch = [], 0
            for loss_value, out, n, done, yb in _execute(model, step, k, _batches(train_data, batch_size, shuffle, rng),
                                                         optimizer, convert):
                seen += n * done
                bar.update(done)
                if not live:
                    pending.append((loss_value, n))
                    continue
                for value in np.asarray(backend.to_numpy(loss_value), np.float64).reshape(-1):
                    logs = {"loss": float(value)}
                    for m in metrics:  # (metrics run one batch per call: done == 1)
                        logs[_metric_name(m)] = _float(m(out, yb))
                    for key, v in logs.items():
                        totals[key] += v * n
                    for cb in callbacks:
                        cb.on_batch_end(batch, logs)
                    batch += 1
                if user_batch_end and forget is not None:
                    forget()
                if not bar.disable:
                    bar.set_postfix({key: f"{totals[key] / seen:.4f}" for key in totals}, refresh=False)
            if pending:  # one transfer per kind of entry for the whole epoch
                b = backend
                scalars = [(v, n) for v, n in pending if v.ndim == 0]
                vectors = [(v, n) for v, n in pending if v.ndim == 1]
                total = 0.0
                if scalars:
                    total += float(np.dot(b.to_numpy(b.xp.stack([v for v, _ in scalars])).astype(np.float64),
                                          [n for _, n in scalars]))
                for v, n in vectors:
                    total += float(b.to_numpy(v).astype(np.float64).sum()) * n
                totals["loss"] = total
            bar.close()
            logs = {k: v / max(seen, 1) for k, v in totals.items()}
            if validation_data is not None:
                logs.update({f"val_{k}": v for k, v in evaluate(model, loss, validation_data, metrics=metrics,
                                                                 batch_size=batch_size).items()})
            history.record(epoch, logs)
            for cb in callbacks:
                cb.on_epoch_end(epoch, logs)
            if forget is not None:
                forget()
            if trainer.stop:
                break
    for cb in callbacks:
        cb.on_train_end(history.history)
    return history


def evaluate(model: Module, loss: Loss | None, data, *, metrics: Iterable = (), batch_size: int = 256) -> dict:
    """Mean ``loss`` and metrics of ``model`` over ``data`` (same forms as ``fit``), in eval mode, without
    gradients (each module's mode is restored afterwards). Returns ``{"loss": ..., "<metric>": ...}``."""
    metrics = list(metrics)
    totals = {**({"loss": 0.0} if loss is not None else {}), **{_metric_name(m): 0.0 for m in metrics}}
    seen = 0
    with model.mode(False), get_backend(model.backend).no_grad():
        for xb, yb in _batches(data, batch_size, False, None):
            xb, yb = _to_model(model, xb), _to_model(model, yb)
            out = model(xb)
            n = xb.shape[0]
            seen += n
            if loss is not None:
                totals["loss"] += _float(loss(out, yb)) * n
            for m in metrics:
                totals[_metric_name(m)] += _float(m(out, yb)) * n
    return {k: v / max(seen, 1) for k, v in totals.items()}


def predict(model: Module, data, batch_size: int = 256):
    """``model``'s outputs for ``data`` (an array, or an iterable of input batches), computed in
    batches in eval mode without gradients and joined along the first axis."""
    b = get_backend(model.backend)
    if hasattr(data, "shape"):
        data = [data[i:i + batch_size] for i in range(0, data.shape[0], batch_size)]
    with model.mode(False), b.no_grad():
        outs = [model(_to_model(model, xb)) for xb in data]
    return b.xp.concat(outs, axis=0) if outs else None
