"""lm.export: a SavedModel that plain TensorFlow serves in a fresh process, and a TFLite flatbuffer whose
interpreter gives the model's outputs; clear errors for bad requests."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import lamina as lm

from conftest import CenteredLayer, MyLinear

pytest.importorskip("tensorflow")

SERVE = textwrap.dedent('''
    import sys
    import numpy as np, tensorflow as tf
    d = sys.argv[1]; x = np.load(d + "/x.npy"); y = np.load(d + "/y.npy")
    m = tf.saved_model.load(d + "/served")
    out = m.signatures["serving_default"](x=tf.constant(x))["output_0"].numpy()
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-5)
    it = tf.lite.Interpreter(model_path=d + "/net.tflite")
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], x.shape); it.allocate_tensors()
    it.set_tensor(inp["index"], x); it.invoke()
    np.testing.assert_allclose(it.get_tensor(it.get_output_details()[0]["index"]), y, rtol=1e-5, atol=1e-5)
    assert not any(m.startswith("lamina") for m in sys.modules)
    print("OK")
''')


def run(code, *args):
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_saved_model_and_tflite_serve_without_lamina(tmp_path):
    lm.set_backend("numpy")
    lm.manual_seed(0)
    net = lm.Sequential(MyLinear(64, 8), CenteredLayer(), lm.Linear(1))  # a numpy model: exported from a copy
    x = np.random.default_rng(0).random((5, 64)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", net(x))  # the numpy backend's outputs: the reference
    lm.export(net, tmp_path / "served", input_shape=(None, 64))
    lm.export(net, tmp_path / "net.tflite", format="tflite", input_shape=(None, 64))
    assert net.backend == "numpy"
    run(SERVE, str(tmp_path))  # plain TensorFlow in a fresh process, lamina never imported


SERVE_CASES = textwrap.dedent('''
    import json, sys
    import numpy as np, tensorflow as tf
    d = sys.argv[1]
    for name, batches in json.load(open(d + "/cases.json")).items():
        m = tf.saved_model.load(f"{d}/{name}")
        it = tf.lite.Interpreter(model_path=f"{d}/{name}.tflite")
        tflite = it.get_signature_runner("serving_default")  # resizes its input to each batch
        for n in batches:
            ref = np.load(f"{d}/{name}_{n}.npz")
            x, ys = ref["x"], [ref[f"y{i}"] for i in range(len(ref.files) - 1)]
            served = m.signatures["serving_default"](x=tf.constant(x))
            lite = tflite(x=x)
            assert len(served) == len(lite) == len(ys), (name, len(served), len(lite), len(ys))
            for i, y in enumerate(ys):
                np.testing.assert_allclose(served[f"output_{i}"].numpy(), y, rtol=1e-5, atol=1e-5, err_msg=name)
                np.testing.assert_allclose(lite[f"output_{i}"], y, rtol=1e-4, atol=1e-5, err_msg=name)
    assert not any(m.startswith("lamina") for m in sys.modules)
    print("OK")
''')


def test_layers_export_for_any_batch_size_and_serve_in_eval_mode(tmp_path):
    """Exported with the batch axis None, served for batches of 2 and 7 by plain TensorFlow and TFLite in a
    fresh process (SERVE_CASES), against the model's own eval-mode outputs (several outputs flattened: an
    LSTM's out, h, c):
    - LSTM, GRU and RNN (the RNN with the time axis None too): the zero initial state takes its size from
      the input at run time, and the time loop converts to TFLite builtins;
    - a CNN with BatchNorm2d (running statistics away from 0 and 1), Dropout and Flatten (its
      x.reshape(x.shape[0], -1)): served in eval mode although the SavedModel writer traces the forward
      again (it had run in training mode: batch statistics and dropout);
    - an Embedding model not built yet, for int64 token ids: built on zeros of that dtype (a float dry run
      is refused by the Embedding); a tensorflow model, so the export builds it, not a copy.
    The references of the others are the numpy backend's outputs."""
    import json

    lm.set_backend("numpy")
    lm.manual_seed(0)
    cnn = lm.Sequential(lm.Conv2d(1, 4, 3), lm.BatchNorm2d(4), lm.ReLU(), lm.Dropout(0.5), lm.MaxPool2d(2),
                        lm.Flatten(), lm.Linear(3))
    rng = np.random.default_rng(1)
    for _ in range(3):  # training-mode calls move the running statistics
        cnn(rng.standard_normal((8, 1, 10, 10)).astype("float32") * 3 + 1)
    assert not np.allclose(np.asarray(cnn[1].running_var), 1.0)
    cases = {  # name: (model, input shape with None axes, dtype)
        "lstm": (lm.LSTM(3, 4, num_layers=2, bidirectional=True), (None, 5, 3), "float32"),
        "gru": (lm.GRU(3, 4, batch_first=False), (5, None, 3), "float32"),
        "rnn": (lm.RNN(3, 4, nonlinearity="relu"), (None, None, 3), "float32"),  # (2, 2, 3) and (7, 7, 3)
        "cnn": (cnn, (None, 1, 10, 10), "float32"),
    }
    lm.set_backend("tensorflow")
    tokens = lm.Sequential(lm.Embedding(10, 8), lm.LayerNorm(8), lm.Linear(2))
    assert not tokens.is_built
    lm.export(tokens, tmp_path / "first", input_shape=(None, 5), dtype="int64")
    assert tokens.is_built
    cases["tokens"] = (tokens, (None, 5), "int64")
    batches = (2, 7)
    for name, (net, shape, dtype) in cases.items():
        for n in batches:
            size = tuple(n if d is None else d for d in shape)
            x = rng.integers(0, 10, size) if dtype == "int64" else rng.standard_normal(size).astype(dtype)
            with net.mode(False):
                out = net(x)
            ys = [out] if not isinstance(out, tuple) else [out[0], *(out[1] if isinstance(out[1], tuple) else out[1:])]
            np.savez(tmp_path / f"{name}_{n}.npz", x=x, **{f"y{i}": np.asarray(y) for i, y in enumerate(ys)})
        lm.export(net, tmp_path / name, input_shape=shape, dtype=dtype)
        lm.export(net, tmp_path / f"{name}.tflite", format="tflite", input_shape=shape, dtype=dtype)
    (tmp_path / "cases.json").write_text(json.dumps({name: batches for name in cases}))
    run(SERVE_CASES, str(tmp_path))


class PeeksAtValues(lm.Module):
    """Branches in Python on an array's value: runs eagerly, cannot be traced into a graph."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_a_layer_that_cannot_be_traced_is_named(tmp_path):
    lm.set_backend("tensorflow")
    net = lm.Sequential(lm.Linear(4, 3), PeeksAtValues())
    with pytest.raises(lm.LayerError, match="could not be traced by tf.function.*no Python branches"):
        lm.export(net, tmp_path / "m", input_shape=(None, 4))


def test_bad_requests_are_clear(tmp_path):
    lm.set_backend("numpy")
    net = lm.Sequential(lm.Linear(3))
    with pytest.raises(ValueError, match="input_shape"):
        lm.export(net, tmp_path / "m")
    with pytest.raises(ValueError, match="unknown format 'onnx'"):
        lm.export(net, tmp_path / "m", format="onnx", input_shape=(None, 4))
    with pytest.raises(TypeError, match="lm.Module"):
        lm.export(np.zeros(3), tmp_path / "m", input_shape=(None, 4))
