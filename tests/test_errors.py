"""Errors name the layer path, what was expected, what was received, and how to fix it."""

import numpy as np
import pytest

import lamina as lm

from conftest import MyLinear, rand


def test_shape_mismatch_names_path_expected_and_received(backend):
    net = lm.Sequential(lm.Linear(16), lm.ReLU(), lm.Linear(8, 1))
    with pytest.raises(lm.ShapeError) as err:
        net(rand(4, 3))
    assert str(err.value).startswith("layer '2' (Linear) expected input with last axis 8, got shape (4, 16).")
    assert "Linear(8, 1) was built for 8 input features" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_shape_mismatch_after_build_in_nested_model(backend):
    net = lm.Sequential(lm.Linear(3, 4), lm.Sequential(lm.ReLU(), lm.Linear(4, 2)))
    net(rand(1, 3))
    with pytest.raises(lm.ShapeError, match=r"^layer '0' \(Linear\) expected input with last axis 3, got shape \(4, 5"):
        net(rand(4, 5))
    inner = net[1][1]
    with pytest.raises(lm.ShapeError, match=r"^layer '1\.1' \(Linear\) .* got shape \(2, 7\)"):
        inner(rand(2, 7))  # called directly: the path still comes from the parent links


def test_failure_inside_a_user_layer_is_annotated_with_its_path(backend):
    net = lm.Sequential(lm.Linear(3, 16), lm.Sequential(MyLinear(8, 1)))
    with pytest.raises(Exception) as err:
        net(rand(4, 3))
    assert "(raised in layer '1.0' (MyLinear), called with input shapes (4, 16))" in err.value.__notes__


def test_error_is_not_decorated_twice(backend):
    shared = lm.Linear(2, 2)
    net = lm.Sequential(shared, lm.Sequential(shared))
    net(rand(1, 2))
    with pytest.raises(lm.ShapeError) as err:
        net(rand(1, 3))
    assert str(err.value).count("layer '") == 1


def test_device_mismatch_names_both_devices():
    torch = pytest.importorskip("torch", reason="torch not installed")
    lm.set_backend("torch")
    net = lm.Sequential(lm.Linear(3, 4))
    net(rand(1, 3))
    with pytest.raises(lm.DeviceError) as err:
        net(torch.ones(2, 3, device="meta"))  # torch's "meta" device stands in for a second device
    assert "on device 'cpu' but got an input on device 'meta'" in str(err.value)
    assert "model.to(device='meta')" in str(err.value)
    assert any("layer '0' (Linear)" in n for n in err.value.__notes__)


def test_bad_constructor_arguments(backend):
    with pytest.raises(ValueError, match="out_features must be a positive int, got 0"):
        lm.Linear(0)
    with pytest.raises(ValueError, match="units must be a positive int"):
        lm.TensorReduction(-1)
    with pytest.raises(ValueError, match="non-negative ints or None"):
        lm.Parameter((2, -3))
    with pytest.raises(TypeError, match="init must be an initializer callable"):
        lm.Parameter((2,), init=3)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        lm.manual_seed(-1)


def test_unknown_device_is_refused(backend):
    with pytest.raises(lm.DeviceError, match=rf"the {backend} backend has no device 'tpu:7'; available: \['cpu'"):
        lm.Linear(2, 2).to(device="tpu:7")


def test_get_parameter_unknown_path_lists_known_ones(backend):
    with pytest.raises(KeyError, match=r"no parameter '0\.kernel'; it has: 0\.weight, 0\.bias"):
        lm.Sequential(lm.Linear(2, 2)).get_parameter("0.kernel")


def test_initializer_returning_wrong_shape(backend):
    layer = lm.Linear(2, 3, weight_init=lambda shape, rng: np.zeros((3, 2)))
    with pytest.raises(lm.ShapeError, match=r"returned shape \(3, 2\), expected \(2, 3\)"):
        layer(rand(1, 2))
