"""The tensorflow backend, checked in a fresh process (torch and TensorFlow 2.21 in one process can abort it;
see conftest.py) against NumPy references, finite differences and the numpy backend."""

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("tensorflow")

SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, "tests")
    import numpy as np, lamina as lm
    from conftest import CenteredLayer, MyLinear, numeric_grad
    x = np.random.default_rng(0).random((4, 64)).astype("float32")

    def net():
        lm.manual_seed(0)
        return lm.Sequential(MyLinear(64, 8), CenteredLayer(), lm.Linear(1))

    lm.set_backend("numpy"); ref = net(); y_np = ref(x)
    lm.set_backend("tensorflow"); m = net(); y = m(x)
    import tensorflow as tf
    assert isinstance(y, tf.Tensor) and isinstance(m[0].weight, tf.Variable)
    np.testing.assert_allclose(y.numpy(), y_np, rtol=1e-5, atol=1e-5)          # same seed, same numbers
    for (k, p), (k2, q) in zip(m.named_parameters(), ref.named_parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy())

    # gradients against central finite differences (float64, numpy)
    W0 = m[2].get_parameter("weight").numpy().astype(np.float64)
    h = np.asarray(m[1](m[0](x)), np.float64)
    b = float(m[2].get_parameter("bias").numpy()[0])
    loss, grads = lm.value_and_grad(lambda mod, x: (mod(x) ** 2).sum())(m, x)
    num = numeric_grad(lambda W: float((((h @ W) + b) ** 2).sum()), W0)
    np.testing.assert_allclose(grads["2.weight"].numpy(), num, rtol=1e-3, atol=1e-3)

    # checkpoints: tensorflow -> numpy and numpy -> tensorflow
    lm.save(m, "/tmp/_lamina_tf.safetensors")
    lm.set_backend("numpy"); back = net(); lm.load_into(back, "/tmp/_lamina_tf.safetensors")
    np.testing.assert_allclose(back(x), y.numpy(), rtol=1e-6, atol=1e-6)

    # fit trains the issue's example
    rng = np.random.default_rng(1)
    X = rng.random((256, 64)).astype("float32"); Y = X[:, :1] * 2.0
    lm.set_backend("tensorflow"); m = net()
    hist = lm.fit(m, lm.losses.mse, lm.optim.Adam(m, lr=1e-2), (X, Y), epochs=5)
    losses = hist.history["loss"]
    assert losses[-1] < losses[0], losses
    print("OK")
''')


def run(code):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_tensorflow_backend_in_fresh_process():
    run(SCRIPT)
