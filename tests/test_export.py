"""lm.export: a SavedModel that plain TensorFlow serves in a fresh process, and a TFLite flatbuffer whose
interpreter gives the model's outputs; clear errors for bad requests."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import lamina as lm

pytest.importorskip("tensorflow")

MAKE = textwrap.dedent('''
    import sys
    sys.path.insert(0, "tests")
    import numpy as np, lamina as lm
    from conftest import CenteredLayer, MyLinear
    lm.set_backend("numpy"); lm.manual_seed(0)
    net = lm.Sequential(MyLinear(64, 8), CenteredLayer(), lm.Linear(1))   # a numpy model: exported from a copy
    x = np.random.default_rng(0).random((5, 64)).astype("float32")
    np.save(sys.argv[1] + "/x.npy", x); np.save(sys.argv[1] + "/y.npy", net(x))
    lm.export(net, sys.argv[1] + "/served", input_shape=(None, 64))
    lm.export(net, sys.argv[1] + "/net.tflite", format="tflite", input_shape=(None, 64))
    assert net.backend == "numpy"
    print("OK")
''')

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
    run(MAKE, str(tmp_path))
    run(SERVE, str(tmp_path))


def test_bad_requests_are_clear(tmp_path):
    lm.set_backend("numpy")
    net = lm.Sequential(lm.Linear(3))
    with pytest.raises(ValueError, match="input_shape"):
        lm.export(net, tmp_path / "m")
    with pytest.raises(ValueError, match="unknown format 'onnx'"):
        lm.export(net, tmp_path / "m", format="onnx", input_shape=(None, 4))
    with pytest.raises(TypeError, match="lm.Module"):
        lm.export(np.zeros(3), tmp_path / "m", input_shape=(None, 4))
