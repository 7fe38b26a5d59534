"""Checkpoints written by earlier versions (tests/goldens/) must keep loading, on every backend."""

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import lamina as lm

from conftest import to_np

GOLDENS = Path(__file__).resolve().parent / "goldens"


def expected_arrays():
    i = np.arange(12)
    return {
        "f32": (i.reshape(3, 4) / 8 - 0.75).astype(np.float32),
        "f16": (i[:4] / 4).astype(np.float16),
        "bf16": (i[:4] - 2).astype(ml_dtypes.bfloat16),
        "i64": (i * 10**9).astype(np.int64),
        "i32": (-i).astype(np.int32),
        "u8": (i * 20).astype(np.uint8),
        "b": i % 3 == 0,
    }


def golden_model():
    shared = lm.Linear(4, 4)
    return lm.Sequential(lm.Linear(4), lm.ReLU(), shared, lm.Tanh(), shared, lm.TensorReduction(2))


def expected_model_values():
    def f(shape, k):
        n = int(np.prod(shape))
        return (np.sin(np.arange(n) * 0.7 + k) / 2).reshape(shape).astype(np.float32)

    return {"0.weight": f((3, 4), 1), "0.bias": f((4,), 2), "2.weight": f((4, 4), 3), "2.bias": f((4,), 4),
            "5.weight": f((4, 4, 2), 5)}


def numpy_forward(v, x):
    h = np.maximum(x @ v["0.weight"] + v["0.bias"], 0)
    h = np.tanh(h @ v["2.weight"] + v["2.bias"])
    h = h @ v["2.weight"] + v["2.bias"]
    return np.einsum("bi,ijk,bj->bk", h, v["5.weight"], h)


def test_golden_arrays_load_with_exact_dtypes_and_values(backend):
    if backend == "jax" and not __import__("jax").config.jax_enable_x64:
        # the file's int64 values reach 1.1e10: jax without x64 would wrap them to int32 (issue 10), so it refuses
        with pytest.raises(ValueError, match="do not fit the int32"):
            lm.load(GOLDENS / "v1_arrays.safetensors")
        return
    back = lm.load(GOLDENS / "v1_arrays.safetensors")
    want = expected_arrays()
    assert list(back) == list(want)
    for k, v in want.items():
        got = to_np(back[k])
        assert got.dtype == v.dtype, k
        np.testing.assert_array_equal(got, v)


def test_golden_list_loads_as_list(backend):
    back = lm.load(GOLDENS / "v1_list.safetensors")
    assert isinstance(back, list) and len(back) == 3
    np.testing.assert_array_equal(to_np(back[0]), expected_arrays()["f32"])


def test_golden_model_loads_retied_into_a_fresh_lazy_model(backend):
    model = golden_model()
    lm.load_into(model, GOLDENS / "v1_model.safetensors")
    assert model.get_parameter("4.weight") is model.get_parameter("2.weight")
    x = (np.arange(6).reshape(2, 3) / 5 - 0.4).astype(np.float32)
    np.testing.assert_allclose(to_np(model(x)), numpy_forward(expected_model_values(), x), rtol=1e-5, atol=1e-6)
