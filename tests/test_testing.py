"""lamina.testing.check_layer: every built-in layer passes it, and it catches broken layers."""

import numpy as np
import pytest

import lamina as lm

from conftest import BACKENDS, GRAD_BACKENDS, CenteredLayer, MyDense, MyLinear

BUILT_INS = {
    "Linear(out)": (lambda: lm.Linear(3), (4, 5), (4, 3)),
    "Linear(in, out)": (lambda: lm.Linear(5, 3, bias=False), (2, 5), (2, 3)),
    "Sequential": (lambda: lm.Sequential(lm.Linear(8), lm.GELU(), lm.Linear(2)), (3, 4), (3, 2)),
    "ReLU": (lambda: lm.ReLU(), (3, 4), (3, 4)),
    "LeakyReLU": (lambda: lm.LeakyReLU(0.2), (3, 4), (3, 4)),
    "Sigmoid": (lambda: lm.Sigmoid(), (3, 4), (3, 4)),
    "Tanh": (lambda: lm.Tanh(), (3, 4), (3, 4)),
    "GELU": (lambda: lm.GELU(approximate=True), (3, 4), (3, 4)),
    "Softmax": (lambda: lm.Softmax(axis=0), (3, 4), (3, 4)),
    "LogSoftmax": (lambda: lm.LogSoftmax(), (3, 4), (3, 4)),
    "Flatten": (lambda: lm.Flatten(), (2, 3, 4), (2, 12)),
    "Identity": (lambda: lm.Identity(), (2, 3), (2, 3)),
    "TensorReduction": (lambda: lm.TensorReduction(2), (3, 5), (3, 2)),
    "LeadingFourier": (lambda: lm.LeadingFourier(), (2, 7), (2, 4)),
    "LeadingFourier(split)": (lambda: lm.LeadingFourier(split=True), (2, 8), (2, 8)),
}


@pytest.mark.parametrize("name", list(BUILT_INS))
def test_every_built_in_layer_passes(backend, name):
    make, in_shape, out_shape = BUILT_INS[name]
    report = lm.testing.check_layer(make(), in_shape, output_shape=out_shape)
    assert report["output shape"] == str(out_shape)
    assert not any(v.startswith("FAILED") for v in report.values())


class Block(lm.Module):
    """A user's layer built from built-ins and the textbook's custom ones."""

    def __init__(self):
        super().__init__()
        self.dense = MyDense(6)
        self.mine = MyLinear(6, 4)
        self.center = CenteredLayer()
        self.heads = [lm.Linear(2), lm.TensorReduction(2)]

    def forward(self, x):
        h = self.center(self.mine(self.dense(x)))
        return self.heads[0](h) + self.heads[1](h)


def test_a_users_layer_passes_with_its_parameter_names(backend):
    report = lm.testing.check_layer(Block(), (None, 3), output_shape=(None, 2), param_names=[
        "dense.weight", "dense.bias", "mine.weight", "mine.bias", "heads.0.weight", "heads.0.bias", "heads.1.weight"])
    if GRAD_BACKENDS:
        assert report["gradients"].startswith("match finite differences")
        assert report["training step"] == "one SGD step changed 7 trainable parameter(s)"


def test_the_layer_is_left_as_it_was(backend):
    layer = lm.Linear(4, 3)
    layer.train()
    before = layer.get_parameter("weight").numpy().copy()
    lm.testing.check_layer(layer, (2, 4))
    assert layer.backend == backend and layer.training
    np.testing.assert_array_equal(layer.get_parameter("weight").numpy(), before)


class CutGradient(lm.Module):
    """Wrong on purpose: the weight is cut off from autodiff (the textbook's `.data` mistake)."""

    def __init__(self):
        super().__init__()
        self.weight = lm.Parameter((3, 2))

    def forward(self, x):
        return x @ lm.ops.stop_gradient(self.weight)  # torch's `.data`, jax's lax.stop_gradient, ...


class BackendDependent(lm.Module):
    """Wrong on purpose: computes something else on numpy."""

    def forward(self, x):
        return x * 2 if isinstance(x, np.ndarray) else x


@pytest.mark.skipif(not GRAD_BACKENDS, reason="needs a backend with autodiff")
def test_a_cut_gradient_is_caught(grad_backend):
    with pytest.raises(lm.testing.LayerCheckError) as err:
        lm.testing.check_layer(CutGradient(), (4, 3))
    assert "training step: one SGD step left ['weight'] unchanged" in str(err.value)
    assert "gradients: weight[" in str(err.value) and "finite differences" in str(err.value)


def test_backend_disagreement_and_wrong_shape_are_caught():
    lm.set_backend(BACKENDS[0])
    if len(BACKENDS) < 2:
        pytest.skip("needs two backends")
    with pytest.raises(lm.testing.LayerCheckError) as err:
        lm.testing.check_layer(BackendDependent(), (2, 3), output_shape=(2, 4))
    msg = str(err.value)
    assert "output shape: declared (2, 4), got (2, 3)" in msg
    assert "backends: numpy differs from" in msg
