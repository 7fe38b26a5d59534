"""Fuzzing with hypothesis: checkpoint headers and metadata, truncated and bit-flipped files, and random
shapes and dtypes into ``load_state_dict``. Every failure must be a ``CheckpointError`` (or, for input of the
wrong type, a ``TypeError``/``ValueError``) that names the file, never a crash or another exception, and a
failed load must leave the model exactly as it was.

The default run is short; ``LAMINA_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py`` runs 5000 examples per
test. Parsing files does not depend on the backend, so the file tests run on NumPy; the
``load_state_dict`` test runs on every backend.
"""

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lamina as lm

from conftest import to_np

EXAMPLES = int(os.environ.get("LAMINA_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


def model():
    lm.set_backend("numpy")
    shared = lm.Linear(3, 3)
    return lm.Sequential(lm.Linear(2, 3), shared, lm.ReLU(), shared, lm.BatchNorm1d(3) if hasattr(lm, "BatchNorm1d")
                         else lm.ReLU())


def snapshot(m):
    return {k: to_np(v).copy() for k, v in m.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def try_load(path):
    """Load ``path`` both ways; return True if it loaded. Any other outcome than a CheckpointError naming
    the file (and, for load_into, an unchanged model) fails the test."""
    ok = True
    try:
        lm.load(path, backend="numpy")
    except lm.CheckpointError as e:
        assert str(path) in str(e), e
        ok = False
    m = model()
    before = snapshot(m)
    try:
        lm.load_into(m, path)
    except lm.CheckpointError as e:
        assert str(path) in str(e), e
        assert same(snapshot(m), before), "a failed load changed the model"
    return ok


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "good.st"
    lm.save(model(), path)
    return path.read_bytes()


def header_of(raw: bytes) -> dict:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n])


def with_header(raw: bytes, header) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + raw[8 + n:]


@FUZZ
@given(data=st.data())
def test_fuzzed_headers_fail_cleanly(good, tmp_path_factory, data):
    header = header_of(good)
    keys = list(header)
    where = data.draw(st.sampled_from(["top", "entry", "field", "meta", "bytes"]))
    if where == "top":
        header = data.draw(json_values)
    elif where == "entry":
        header[data.draw(st.sampled_from(keys))] = data.draw(json_values)
    elif where == "field":
        k = data.draw(st.sampled_from([k for k in keys if k != "__metadata__"]))
        header[k][data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = data.draw(json_values)
    elif where == "meta":
        name = data.draw(st.sampled_from(["kind", "keys", "aliases", "format_version", "optimizer_steps", "format"]))
        header["__metadata__"][name] = data.draw(st.text(max_size=20) | json_values.map(json.dumps))
    else:
        header = data.draw(st.binary(max_size=64))
    path = tmp_path_factory.mktemp("h") / "fuzzed.st"
    path.write_bytes(with_header(good, header))
    try_load(path)


@FUZZ
@given(cut=st.integers(0, 10**6), flips=st.lists(st.integers(0, 10**7), max_size=4))
def test_truncated_and_bit_flipped_files_fail_cleanly(good, tmp_path_factory, cut, flips):
    raw = bytearray(good)
    for f in flips:
        raw[(f // 8) % len(raw)] ^= 1 << (f % 8)
    raw = bytes(raw[: len(raw) - cut % (len(raw) + 1)]) if cut % 3 == 0 else bytes(raw)
    path = tmp_path_factory.mktemp("b") / "flipped.st"
    path.write_bytes(raw)
    if try_load(path) and raw == good:
        assert same(snapshot(lm.load_into(model(), path)), snapshot(lm.load_into(model(), path)))


DTYPES = ["float32", "float64", "float16", "int32", "int64", "uint8", "bool", "complex64"]


@FUZZ
@given(data=st.data())
def test_load_state_dict_with_random_shapes_and_dtypes_is_all_or_nothing(backend, data):
    m = lm.Sequential(lm.Linear(2, 3), lm.ReLU(), lm.Linear(3, 2))
    keys = list(m.state_dict())
    chosen = data.draw(st.lists(st.sampled_from(keys + ["extra", "0.nope"]), unique=True, max_size=6))
    state = {}
    for k in chosen:
        right = tuple(m.state_dict()[k].shape) if k in keys else (2,)
        shape = data.draw(st.sampled_from([right, right, (), (1,) + right, right[:-1], tuple(d + 1 for d in right)]))
        dtype = data.draw(st.sampled_from(DTYPES))
        state[k] = np.random.default_rng(len(state)).normal(size=shape).astype(dtype)
    before = snapshot(m)
    strict = data.draw(st.booleans())
    try:
        m.load_state_dict(state, strict=strict)
    except (TypeError, ValueError) as e:  # CheckpointError is a ValueError
        assert isinstance(e, lm.CheckpointError | TypeError), repr(e)
        assert same(snapshot(m), before), "a failed load changed the model"
        return
    after = snapshot(m)
    for k in keys:  # an independent check: each value is the given one (cast to the parameter's dtype)
        if k in state:
            np.testing.assert_array_equal(after[k], state[k].astype(after[k].dtype))
        else:
            np.testing.assert_array_equal(after[k], before[k])
