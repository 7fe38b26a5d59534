"""Random bad inputs into every built-in layer (issue 10): wrong ranks, sizes, dtypes, empty axes, NaN.

A layer built for one input either computes (and then gives the same answer as for that input run alone) or
refuses with a clean error: a lamina error, or a ValueError/TypeError raised by lamina's own code (a
backend's RuntimeError/IndexError/OpError, or a ValueError raised inside numpy, means bad input reached a
kernel). Never a crash of the process (the
torch LSTM used to segfault on a wrong feature size), and never a changed layer: after any refusal the layer
gives exactly its earlier output on the input it was built for.

``LAMINA_FUZZ_EXAMPLES=2000`` runs more examples per layer and backend.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lamina as lm

from conftest import to_np

EXAMPLES = int(os.environ.get("LAMINA_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# name: (factory, the input shape it is built for, the input dtype it takes)
LAYERS = {
    "Linear": (lambda: lm.Linear(4), (3, 5), "float32"),
    "Conv1d": (lambda: lm.Conv1d(4, 3), (2, 3, 9), "float32"),
    "Conv2d": (lambda: lm.Conv2d(4, 3), (2, 3, 8, 8), "float32"),
    "MaxPool2d": (lambda: lm.MaxPool2d(2), (2, 3, 8, 8), "float32"),
    "AvgPool1d": (lambda: lm.AvgPool1d(2), (2, 3, 8), "float32"),
    "BatchNorm1d": (lambda: lm.BatchNorm1d(), (4, 3), "float32"),
    "BatchNorm2d": (lambda: lm.BatchNorm2d(), (2, 3, 4, 4), "float32"),
    "LayerNorm": (lambda: lm.LayerNorm(), (2, 6), "float32"),
    "RMSNorm": (lambda: lm.RMSNorm(), (2, 6), "float32"),
    "Embedding": (lambda: lm.Embedding(10, 4), (2, 5), "int64"),
    "RNN": (lambda: lm.RNN(6), (2, 4, 3), "float32"),
    "GRU": (lambda: lm.GRU(6), (2, 4, 3), "float32"),
    "LSTM": (lambda: lm.LSTM(6), (2, 4, 3), "float32"),
    "MultiHeadAttention": (lambda: lm.MultiHeadAttention(8, 2), (2, 5, 8), "float32"),
    "TensorReduction": (lambda: lm.TensorReduction(3), (2, 4), "float32"),
}

LAMINA_DIR = os.path.dirname(lm.__file__)


def is_clean_refusal(e: BaseException) -> bool:
    """A lamina error, or a ValueError/TypeError that lamina itself raised (its innermost frame is in lamina's
    code). A backend's own error (torch's RuntimeError/IndexError, tf.errors.OpError, numpy's ValueError from
    inside numpy, jax's TypeError from lax.scan) means bad input reached a native kernel unchecked."""
    if isinstance(e, lm.LaminaError):
        return True
    if not isinstance(e, ValueError | TypeError):
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(LAMINA_DIR)


shapes = st.lists(st.integers(0, 9), min_size=0, max_size=5).map(tuple)
dtypes = st.sampled_from(["float32", "float64", "int32", "int64", "bool", "complex64"])


def make(name, dtype_ok=None):
    factory, shape, dtype = LAYERS[name]
    layer = factory()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if dtype == "int64":
        x = np.random.default_rng(0).integers(0, 10, shape)
    layer.eval()  # BatchNorm: the same answer each time
    return layer, x


def values(shape, dtype, rng):
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype.startswith("int"):
        return rng.integers(-12, 12, shape).astype(dtype)
    a = rng.standard_normal(shape).astype(dtype)
    if a.size:
        a.flat[0] = np.nan
    return a


@pytest.mark.parametrize("name", list(LAYERS))
def test_random_inputs_are_computed_or_refused_cleanly_and_change_nothing(backend, name):
    layer, good = make(name)
    first = layer(good)
    reference = [to_np(o) for o in (first if isinstance(first, tuple) else (first,)) if not isinstance(o, tuple)]
    rng = np.random.default_rng(1)

    @FUZZ
    @given(shape=shapes, dtype=dtypes)
    def attempt(shape, dtype):
        x = values(shape, dtype, rng)
        try:
            layer(x)
        except Exception as e:  # noqa: BLE001 - judged below
            assert is_clean_refusal(e), f"{name} on {shape} {dtype}: raw backend error {type(e).__name__}: {e}"
        again = layer(good)
        outs = [to_np(o) for o in (again if isinstance(again, tuple) else (again,)) if not isinstance(o, tuple)]
        for a, b in zip(outs, reference):
            np.testing.assert_array_equal(a, b)

    attempt()
