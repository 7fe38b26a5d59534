"""The "Lazy initialization" part of the builders' guide."""

import numpy as np
import pytest

import lamina as lm

from conftest import rand, to_np


def test_unbuilt_parameters_have_no_value_and_say_how_to_build(backend):
    net = lm.Sequential(lm.Linear(256), lm.ReLU(), lm.Linear(10))
    assert [(n, p.shape) for n, p in net.named_parameters()] == [
        ("0.weight", (None, 256)), ("0.bias", (256,)), ("2.weight", (None, 10)), ("2.bias", (10,))]
    assert not net.get_parameter("0.weight").is_built
    with pytest.raises(lm.UninitializedParameterError) as err:
        _ = net[0].weight
    msg = str(err.value)
    assert "'0.weight'" in msg and "(?, 256)" in msg and "model.build(input_shape)" in msg and "once" in msg


def test_first_call_infers_shapes(backend):
    net = lm.Sequential(lm.Linear(256), lm.ReLU(), lm.Linear(10))
    net(rand(2, 20))
    assert net.get_parameter("0.weight").shape == (20, 256)
    assert net.get_parameter("2.weight").shape == (256, 10)
    assert tuple(net[0].weight.shape) == (20, 256)


def test_dry_run_then_initialize(backend):
    net = lm.Sequential(lm.Linear(256), lm.ReLU(), lm.Linear(10))
    net.build((None, 20))
    assert net.get_parameter("0.weight").shape == (20, 256)
    assert all(m.training for m in net.modules())  # the dry run restores training mode
    net.reinitialize(weight=lm.init.normal(0, 0.01), bias=lm.init.zeros())
    w = to_np(net[0].weight)
    assert abs(w.std() - 0.01) < 1e-3
    x = rand(3, 20)
    h = np.maximum(x @ w, 0)
    np.testing.assert_allclose(to_np(net(x)), h @ to_np(net[2].weight), rtol=1e-4, atol=1e-6)


def test_build_hook_runs_once(backend):
    calls = []

    class Counting(lm.Module):
        def build(self, input_shape):
            calls.append(input_shape)
            self.scale = lm.Parameter((input_shape[-1],), init=lm.init.ones())

        def forward(self, x):
            return x * self.scale

    layer = Counting()
    layer(rand(2, 3))
    layer(rand(4, 3))
    layer.build((None, 3))
    assert calls == [(2, 3)]


def test_build_hook_can_extend_a_parent_hook(backend):
    class Base(lm.Module):
        def build(self, input_shape):
            self.w = lm.Parameter((input_shape[-1], 2), init=lm.init.ones())

        def forward(self, x):
            return x @ self.w

    class Child(Base):
        def build(self, input_shape):
            super().build(input_shape)
            self.b = lm.Parameter((2,), init=lm.init.constant(0.5))

        def forward(self, x):
            return super().forward(x) + self.b

    out = Child()(np.ones((1, 3), np.float32))
    np.testing.assert_allclose(to_np(out), [[3.5, 3.5]])


def test_parameter_declared_unknown_but_never_materialized_is_an_error(backend):
    class Forgot(lm.Module):
        def __init__(self):
            super().__init__()
            self.w = lm.Parameter((None, 3))

        def build(self, input_shape):
            pass

        def forward(self, x):
            return x @ self.w

    with pytest.raises(lm.UninitializedParameterError, match=r"parameter 'w'.*materialize"):
        Forgot()(rand(2, 4))


def test_a_built_model_that_gets_a_lazy_layer_is_unbuilt_again(backend):
    """``is_built`` is remembered per structure (value_and_grad and fit ask it on every call), so a layer added
    later must count: the model is unbuilt until it sees an input again, then built with the new shapes."""
    net = lm.Sequential(lm.Linear(4, 3))
    net(rand(5, 4))
    assert net.is_built
    net.append(lm.Linear(2))
    assert not net.is_built and not net.get_parameter("1.weight").is_built
    net(rand(5, 4))
    assert net.is_built and net.get_parameter("1.weight").shape == (3, 2)
    net[1].extra = lm.Parameter((None, 7))  # a lazy parameter assigned to a built layer
    assert not net.is_built
