"""The "Parameters" part of the builders' guide."""

import numpy as np
import pytest

import lamina as lm

from conftest import rand, sum_loss, to_np


def make_net():
    return lm.Sequential(lm.Linear(8), lm.ReLU(), lm.Linear(1))


def test_index_a_layer_and_list_its_parameters(backend):
    net = make_net()
    net(rand(2, 4))
    layer = net[2]
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    assert [(n, p.shape) for n, p in net.named_parameters()] == [
        ("0.weight", (4, 8)), ("0.bias", (8,)), ("2.weight", (8, 1)), ("2.bias", (1,))]


def test_a_parameter_has_name_shape_dtype_init_trainable_value_and_grad(grad_backend):
    net = make_net()
    x = rand(2, 4)
    net(x)
    p = net.get_parameter("2.bias")
    assert p.name == "bias" and p.shape == (1,) and p.dtype == "float32" and p.trainable
    assert "zeros" in repr(p.init)
    assert lm.backend_of(p.value).name == grad_backend and p.value is net[2].bias
    assert p.grad is None
    lm.value_and_grad(sum_loss)(net, x)
    h = np.maximum(x @ to_np(net[0].weight) + to_np(net[0].bias), 0)
    y = h @ to_np(net[2].weight) + to_np(net[2].bias)
    np.testing.assert_allclose(to_np(p.grad), (2 * y).sum(0), rtol=1e-4, atol=1e-5)


def test_torch_backward_fills_grad_of_each_parameter():
    pytest.importorskip("torch", reason="torch backend not installed")
    lm.set_backend("torch")
    net = make_net()
    x = rand(2, 4)
    loss = sum_loss(net, x)
    loss.backward()
    for path, p in net.named_parameters():
        assert p.grad is not None, path
        assert p.grad is p.value.grad
    _, grads = lm.value_and_grad(sum_loss)(net, x)
    for path, p in net.named_parameters():
        np.testing.assert_allclose(to_np(grads[path]), to_np(p.grad), rtol=1e-5, atol=1e-6)


def tied_net():
    shared = lm.Linear(8)
    return lm.Sequential(lm.Linear(8), lm.ReLU(), shared, lm.ReLU(), shared, lm.ReLU(), lm.Linear(1)), shared


def test_tied_parameters_are_listed_once_and_change_together(backend):
    net, shared = tied_net()
    net(rand(2, 4))
    names = [n for n, _ in net.named_parameters()]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "6.weight", "6.bias"]
    assert net[2] is net[4]
    assert net.get_parameter("4.weight") is net.get_parameter("2.weight")
    net[2].weight = np.full((8, 8), 3.0, np.float32)
    np.testing.assert_array_equal(to_np(net[4].weight), 3.0)


def test_tied_gradient_is_the_sum_of_both_uses(grad_backend):
    net, shared = tied_net()
    net.reinitialize(bias=lm.init.constant(0.1))
    x = rand(3, 4)
    _, grads = lm.value_and_grad(sum_loss)(net, x)
    assert "4.weight" not in grads
    # Untie: the same weights as two separate layers; the tied gradient must be their sum.
    untied = lm.Sequential(lm.Linear(4, 8), lm.ReLU(), lm.Linear(8, 8), lm.ReLU(), lm.Linear(8, 8), lm.ReLU(),
                           lm.Linear(8, 1))
    values = {k: to_np(v) for k, v in net.state_dict().items()}
    values.update({"4.weight": values["2.weight"], "4.bias": values["2.bias"]})
    for k, v in values.items():
        untied.get_parameter(k).value = v
    _, ug = lm.value_and_grad(sum_loss)(untied, x)
    np.testing.assert_allclose(to_np(grads["2.weight"]), to_np(ug["2.weight"]) + to_np(ug["4.weight"]),
                               rtol=1e-4, atol=1e-5)
    assert np.abs(to_np(ug["2.weight"])).sum() > 0 and np.abs(to_np(ug["4.weight"])).sum() > 0


def test_sharing_a_parameter_object_between_modules(grad_backend):
    a, b = lm.Linear(3, 3), lm.Linear(3, 3)
    b.weight = a.get_parameter("weight")
    net = lm.Sequential(a, b)
    assert [n for n, _ in net.named_parameters()] == ["0.weight", "0.bias", "1.bias"]
    assert net[1].weight is net[0].weight
    _, grads = lm.value_and_grad(sum_loss)(net, rand(2, 3))
    assert set(grads) == {"0.weight", "0.bias", "1.bias"}


def test_set_parameter_values_directly(backend):
    net = make_net()
    net(rand(2, 4))
    before = to_np(net[0].weight).copy()
    if backend == "jax":  # immutable arrays: assign a new one
        net[0].weight = net[0].weight + 1
        net[0].weight = net[0].weight.at[0, 0].set(42)
    elif backend == "torch":  # exactly what a PyTorch user writes
        import torch

        with torch.no_grad():
            net[0].weight += 1
            net[0].weight[0, 0] = 42
    elif backend == "tensorflow":  # tf.Variable: assign in place
        net[0].weight.assign(net[0].weight + 1)
        net[0].weight[0, 0].assign(42.0)
    else:
        net[0].weight += 1
        net[0].weight[0, 0] = 42
    after = to_np(net[0].weight)
    expected = before + 1
    expected[0, 0] = 42
    np.testing.assert_allclose(after, expected)
    np.testing.assert_allclose(to_np(net.get_parameter("0.weight").value), expected)


def test_assigning_wrong_shape_raises_and_keeps_old_value(backend):
    layer = lm.Linear(2, 3)
    old = to_np(layer.weight).copy()
    with pytest.raises(lm.ShapeError, match=r"has shape \(2, 3\); cannot assign an array of shape \(3, 3\)"):
        layer.weight = np.zeros((3, 3), np.float32)
    np.testing.assert_array_equal(to_np(layer.weight), old)


def test_assignment_casts_to_parameter_dtype(backend):
    layer = lm.Linear(2, 3)
    layer.weight = np.ones((2, 3))  # float64 in, stays float32
    assert to_np(layer.weight).dtype == np.float32


def test_frozen_parameter_gets_no_gradient(grad_backend):
    layer = lm.Linear(2, 3)
    layer(rand(1, 2))  # values drawn while trainable
    layer.get_parameter("bias").trainable = False
    _, grads = lm.value_and_grad(sum_loss)(layer, rand(4, 2))
    assert set(grads) == {"weight"}
    if grad_backend == "torch":
        assert not layer.bias.requires_grad


# ----- construction (adversarial review, item 4) -------------------------------------------------------
def test_parameter_shape_and_value_that_disagree_is_a_shape_error():
    with pytest.raises(lm.ShapeError, match=r"given shape \(3, 4\) and a value of shape \(2, 2\)") as e:
        lm.Parameter((3, 4), value=np.ones((2, 2)))
    assert "NoneType" not in str(e.value)
    p = lm.Parameter((2, 2), value=np.ones((2, 2), np.float32))
    assert p.shape == (2, 2) and p.dtype == "float32"
    assert lm.Parameter((2,), value=np.ones(2), dtype="float32").dtype == "float32"


@pytest.mark.parametrize("bad, error, match", [
    (-1, ValueError, "non-negative"),
    (2.5, TypeError, r"lm.Parameter\(value=2.5\)"),
    (np.float32(2), TypeError, r"lm.Parameter\(value="),
    ([1.0, 2.0], TypeError, r"lm.Parameter\(value=\[1.0, 2.0\]\)"),
    ((2, 1.5), TypeError, "value="),
    (True, TypeError, "int or a tuple of ints"),
])
def test_parameter_refuses_what_is_not_a_shape_with_a_hint(bad, error, match):
    with pytest.raises(error, match=match):
        lm.Parameter(bad)


def test_parameter_list_of_ints_stays_a_shape_and_values_go_through_value():
    assert lm.Parameter([2, 3]).shape == (2, 3) and lm.Parameter(3).shape == (3,)
    p = lm.Parameter(value=[1.0, 2.0])
    assert p.shape == (2,) and p.dtype == "float32"  # torch.nn.Parameter(torch.tensor([1., 2.])) is float32 too
    assert lm.Parameter(value=2.5).shape == ()


def test_register_buffer_none_is_none_and_not_saved_as_torch(backend):
    torch = pytest.importorskip("torch")
    m = lm.Linear(2, 3)
    m.register_buffer("nn", None)
    ref = torch.nn.Linear(2, 3)
    ref.register_buffer("nn", None)
    assert m.nn is None and ref.nn is None
    assert sorted(m.state_dict()) == sorted(ref.state_dict()) == ["bias", "weight"]
    assert [n for n, _ in m.named_buffers()] == [n for n, _ in ref.named_buffers()] == []


def test_owner_and_the_references_lamina_keeps(backend):
    """``p.owner``: the module that holds the parameter, None for a free one. ``p.own_references()``: the
    parameter's reference to its value and one per module attribute showing it (what a training room compares
    the value's reference count with)."""
    import sys

    layer = lm.Linear(3, 2)
    w = layer.get_parameter("weight")
    assert w.owner is layer and lm.Parameter((2,)).owner is None
    _ = w.value  # (drawn)
    assert w.own_references() == 2  # the parameter and layer.__dict__["weight"]
    free = lm.Parameter(value=np.ones(2, np.float32))
    assert free.own_references() == 0  # not drawn yet: no value
    v = free.value
    assert free.own_references() == 1
    # the count is what it says: the value's references are Lamina's, this test's name v, and getrefcount's
    assert sys.getrefcount(v) == free.own_references() + 2
