"""Shared fixtures: every backend-neutral test runs once per installed backend."""

from __future__ import annotations

import linecache
import os
import sys

import numpy as np
import pytest

import lamina as lm

# Every installed backend, tensorflow included; LAMINA_TEST_BACKENDS=torch,numpy picks the backends explicitly.
BACKENDS = (os.environ["LAMINA_TEST_BACKENDS"].split(",") if os.environ.get("LAMINA_TEST_BACKENDS")
            else lm.available_backends())
GRAD_BACKENDS = [b for b in BACKENDS if lm.get_backend(b).has_autodiff]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Selects each installed backend in turn (and restores the previous choice afterwards)."""
    lm.set_backend(request.param)
    lm.manual_seed(0)
    yield request.param


@pytest.fixture(params=GRAD_BACKENDS)
def grad_backend(request):
    """Each installed backend that has automatic differentiation."""
    lm.set_backend(request.param)
    lm.manual_seed(0)
    yield request.param


def to_np(x) -> np.ndarray:
    """Any backend's array as a NumPy array."""
    b = lm.backend_of(x)
    return np.asarray(x) if b is None else np.asarray(b.to_numpy(x))


def weights(model) -> dict:
    """A model's state as float64 NumPy arrays, by name."""
    return {k: to_np(v).astype(np.float64) for k, v in model.state_dict().items()}


class TwoInputs(lm.Module):
    """``forward(a, b) = a @ Wa + b @ Wb + bias``: a model with two inputs of different widths."""

    def __init__(self):
        super().__init__()
        self.wa = lm.Parameter((3, 2), init=lm.init.normal())
        self.wb = lm.Parameter((4, 2), init=lm.init.normal())
        self.bias = lm.Parameter((2,), init=lm.init.zeros())

    def forward(self, a, b):
        return a @ self.wa + b @ self.wb + self.bias


def rand(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class CenteredLayer(lm.Module):
    def forward(self, X):
        return X - X.mean()


class MyLinear(lm.Module):
    def __init__(self, in_units, units):
        super().__init__()
        self.weight = lm.Parameter((in_units, units), init=lm.init.normal())
        self.bias = lm.Parameter((units,), init=lm.init.normal())

    def forward(self, X):
        return lm.ops.relu(X @ self.weight + self.bias)


class MyDense(lm.Module):
    """The textbook's lazily sized Keras layer, written as a build hook."""

    def __init__(self, units):
        super().__init__()
        self.units = units

    def build(self, input_shape):
        self.weight = lm.Parameter((input_shape[-1], self.units), init=lm.init.normal())
        self.bias = lm.Parameter((self.units,), init=lm.init.zeros())

    def forward(self, X):
        return lm.ops.relu(X @ self.weight + self.bias)


def numeric_grad(loss, W: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of ``loss(W)`` (float64) with respect to every element of ``W``."""
    grad = np.zeros_like(W, dtype=np.float64)
    for idx in np.ndindex(*W.shape):
        d = np.zeros_like(W, dtype=np.float64)
        d[idx] = eps
        grad[idx] = (loss(W + d) - loss(W - d)) / (2 * eps)
    return grad


def sum_loss(model, x):
    """A scalar loss for gradient tests, written so that it works on every backend."""
    return (model(x) ** 2).sum()


def interrupt_at(function: str, nth: int, on: str) -> list:
    """Raise KeyboardInterrupt (with ``sys.settrace``) the ``nth`` time ``function`` (a name: Lamina's code) is
    entered (``on="call"``), returns (``on="return"``: in place of its result), or is about to run a line that
    contains the text ``on``. The caller clears the trace afterwards (``sys.settrace(None)``). Returns the
    counter of hits."""
    hits = [0]

    def hit():
        hits[0] += 1
        if hits[0] == nth:
            sys.settrace(None)
            raise KeyboardInterrupt

    def tracer(frame, event, arg):
        if frame.f_code.co_name != function:
            return None
        if event == on == "call" or event == on == "return":
            hit()
        elif event == "line" and on not in ("call", "return") and on in linecache.getline(frame.f_code.co_filename,
                                                                                            frame.f_lineno):
            hit()
        return tracer

    sys.settrace(tracer)
    return hits
