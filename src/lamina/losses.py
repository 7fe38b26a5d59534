"""Losses and metrics: means over the batch, numerically stable, native where that is faster.

``outputs`` and ``targets`` are arrays of one backend. All losses return a 0-d array that the backend can
differentiate.

>>> import lamina as lm, numpy as np
>>> float(lm.losses.cross_entropy(np.array([[0.0, 0.0]]), np.array([1])))  # log(2)
0.6931471805599453
"""

from __future__ import annotations

from .ops.nn import _backend

__all__ = ["cross_entropy", "mse", "binary_cross_entropy_with_logits", "accuracy"]


def cross_entropy(logits, labels):
    """Softmax cross-entropy from logits (N, C), computed through logsumexp.

    ``labels``: integer class indices (N,), or one-hot / class probabilities (N, C) of floats.
    """
    return _backend(logits).cross_entropy(logits, labels)


def mse(pred, target):
    """Mean squared error."""
    return _backend(pred).mse(pred, target)


def binary_cross_entropy_with_logits(logits, targets):
    """Binary cross-entropy of sigmoid(logits) against targets in [0, 1], stable for large |logits|."""
    return _backend(logits).binary_cross_entropy_with_logits(logits, targets)


def accuracy(scores, labels):
    """Fraction of rows whose largest score is the label (integer labels, or one-hot)."""
    return _backend(scores).accuracy(scores, labels)
