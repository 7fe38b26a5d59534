"""Losses and metrics: means over the batch, numerically stable, native where that is faster.

``outputs`` are arrays of one backend; ``targets`` may be arrays of the same backend, NumPy arrays or
lists (converted to the outputs' backend and device). Shapes are checked, never broadcast: a prediction
of shape (N, 1) against targets of shape (N,) is a ``ValueError`` naming both shapes, not the mean of an
N x N matrix. Integer labels are checked to lie in [0, classes) wherever their values are known (not
inside a jax trace). All losses return a 0-d array that the backend can differentiate.

>>> import lamina as lm, numpy as np
>>> float(lm.losses.cross_entropy(np.array([[0.0, 0.0]]), np.array([1])))  # log(2)
0.6931471805599453
"""

from __future__ import annotations

from .backends import backend_of
from .errors import BackendError
from .ops import asarray

__all__ = ["cross_entropy", "mse", "binary_cross_entropy_with_logits", "accuracy"]


def _backend(x, what: str):
    b = backend_of(x)
    if b is None:
        raise BackendError(f"{what} must be an array of torch, jax or numpy, got {type(x).__name__}")
    return b


def _shape(x) -> tuple:
    return tuple(x.shape)


def _class_labels(fn: str, b, scores, labels):
    """Integer labels (N,) for scores (N, C) (any leading axes), checked; (N, 1) labels are squeezed."""
    lead = _shape(scores)[:-1]
    if _shape(labels) == lead + (1,):
        labels = labels[..., 0]
    if _shape(labels) != lead:
        raise ValueError(f"{fn}: integer labels must have shape {lead} for scores of shape {_shape(scores)} "
                         f"(one class index per row), got labels of shape {_shape(labels)}")
    bounds = b.value_range(labels)
    classes = scores.shape[-1]
    if bounds is not None and (bounds[0] < 0 or bounds[1] >= classes):
        bad = bounds[0] if bounds[0] < 0 else bounds[1]
        raise ValueError(f"{fn}: label {bad} is not a class of scores with {classes} classes; labels must be "
                         f"in [0, {classes - 1}]")
    return labels


def _check_same(fn: str, a_name: str, a, b_name: str, b) -> None:
    if _shape(a) != _shape(b):
        raise ValueError(f"{fn}: {a_name} of shape {_shape(a)} and {b_name} of shape {_shape(b)} differ; give "
                         f"them the same shape (e.g. y.reshape({_shape(a)})) rather than let them broadcast")


def cross_entropy(logits, labels):
    """Softmax cross-entropy from logits (N, C) (or (..., C)), computed through logsumexp.

    ``labels``: integer class indices (N,) in [0, C) ((N, 1) is accepted too), or one-hot / class
    probabilities (N, C) of floats.
    """
    b = _backend(logits, "cross_entropy: logits")
    labels = asarray(labels, like=logits)
    if b.is_integral(labels):
        labels = _class_labels("cross_entropy", b, logits, labels)
    else:
        _check_same("cross_entropy", "logits", logits, "class probabilities", labels)
    return b.cross_entropy(logits, labels)


def mse(pred, target):
    """Mean squared error of ``pred`` and ``target`` of the same shape (a 0-d target is a constant)."""
    b = _backend(pred, "mse: pred")
    target = asarray(target, like=pred)
    if target.ndim:
        _check_same("mse", "pred", pred, "target", target)
    return b.mse(pred, target)


def binary_cross_entropy_with_logits(logits, targets):
    """Binary cross-entropy of sigmoid(logits) against targets in [0, 1] of the same shape, stable for
    large |logits|."""
    b = _backend(logits, "binary_cross_entropy_with_logits: logits")
    targets = asarray(targets, like=logits)
    _check_same("binary_cross_entropy_with_logits", "logits", logits, "targets", targets)
    return b.binary_cross_entropy_with_logits(logits, targets)


def accuracy(scores, labels):
    """Fraction of rows whose largest score is the label: scores (N, C) with C >= 2; labels integer class
    indices (N,) (or (N, 1)) or one-hot (N, C)."""
    b = _backend(scores, "accuracy: scores")
    labels = asarray(labels, like=scores)
    if scores.ndim < 1 or scores.shape[-1] < 2:
        raise ValueError(f"accuracy: needs one score per class, (N, C) with C >= 2, got scores of shape "
                         f"{_shape(scores)}; for one logit per example compare (scores > 0) with the labels")
    if b.is_integral(labels):
        labels = _class_labels("accuracy", b, scores, labels)
    else:
        _check_same("accuracy", "scores", scores, "one-hot labels", labels)
    return b.accuracy(scores, labels)
