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
