"""The "Modules" part of the builders' guide, and Module's housekeeping."""

import numpy as np
import pytest

import lamina as lm

from conftest import MyLinear, rand, to_np


def test_sequential_from_a_list(backend):
    net = lm.Sequential([lm.Linear(256), lm.ReLU(), lm.Linear(10)])
    x = rand(2, 20)
    y = net(x)
    assert tuple(y.shape) == (2, 10)
    h = np.maximum(x @ to_np(net[0].weight) + to_np(net[0].bias), 0)
    np.testing.assert_allclose(to_np(y), h @ to_np(net[2].weight) + to_np(net[2].bias), rtol=1e-4, atol=1e-5)


def test_sequential_indexing_slicing_len_iteration_append(backend):
    a, b, c = lm.Linear(4), lm.ReLU(), lm.Linear(2)
    net = lm.Sequential(a, b)
    assert len(net) == 2 and net[0] is a and net[-1] is b and list(net) == [a, b]
    net.append(c)
    assert len(net) == 3 and net[2] is c
    head = net[:2]
    assert isinstance(head, lm.Sequential) and list(head) == [a, b]
    assert tuple(net(rand(3, 5)).shape) == (3, 2)
    assert tuple(head(rand(3, 5)).shape) == (3, 4)
    with pytest.raises(IndexError, match="out of range"):
        net[3]


class Holder(lm.Module):
    def __init__(self):
        super().__init__()
        self.in_list = [lm.Linear(3, 3), lm.Linear(3, 3)]
        self.in_tuple = (lm.Linear(3, 2),)
        self.in_dict = {"head": lm.Linear(2, 1)}

    def forward(self, x):
        for layer in self.in_list:
            x = layer(x)
        return self.in_dict["head"](self.in_tuple[0](x))


def test_children_in_lists_tuples_and_dicts_register(backend):
    m = Holder()
    names = [n for n, _ in m.named_parameters()]
    assert names == ["in_list.0.weight", "in_list.0.bias", "in_list.1.weight", "in_list.1.bias",
                     "in_tuple.0.weight", "in_tuple.0.bias", "in_dict.head.weight", "in_dict.head.bias"]
    assert tuple(m(rand(2, 3)).shape) == (2, 1)
    m.in_list.append(lm.Linear(3, 3))  # registers later additions too
    assert "in_list.2.weight" in dict(m.named_parameters())


def test_mixed_list_of_layers_and_other_values_is_rejected(backend):
    class Bad(lm.Module):
        def __init__(self):
            super().__init__()
            self.stuff = [lm.ReLU(), 3]

    with pytest.raises(TypeError, match="may hold only modules"):
        Bad()


def test_forgetting_super_init_gives_a_clear_error(backend):
    class Forgot(lm.Module):
        def __init__(self):
            self.layer = lm.Linear(2)

    with pytest.raises(lm.ModuleError, match=r"Forgot.__init__ must call super\(\).__init__\(\)"):
        Forgot()

    class ForgotToo(lm.Module):
        def __init__(self):
            self.units = 3

        def forward(self, x):
            return x

    with pytest.raises(lm.ModuleError, match="super"):
        ForgotToo()(rand(2))


class WhileNet(lm.Module):
    """The textbook's FancyMLP-style control flow: halve while the norm is large."""

    def __init__(self):
        super().__init__()
        self.linear = lm.Linear(20, 20)

    def forward(self, x):
        x = self.linear(x)
        while abs(x).sum() > 1:
            x = x / 2
        return x.sum()


def test_python_control_flow_in_forward(backend):
    net = WhileNet()
    x = rand(2, 20)
    h = x @ to_np(net.linear.weight) + to_np(net.linear.bias)
    while np.abs(h).sum() > 1:
        h = h / 2
    np.testing.assert_allclose(float(to_np(net(x))), h.sum(), rtol=1e-4)


class WithBuffer(lm.Module):
    def __init__(self):
        super().__init__()
        self.rand_weight = lm.Buffer(np.arange(6, dtype=np.float32).reshape(2, 3))
        self.steps = lm.Buffer(np.zeros((), dtype=np.int64))
        self.linear = lm.Linear(3, 3)

    def forward(self, x):
        return self.linear(x) @ self.rand_weight.T


def test_buffers_are_constant_saved_and_not_trained(grad_backend):
    m = WithBuffer()
    assert [n for n, _ in m.named_parameters()] == ["linear.weight", "linear.bias"]
    assert [n for n, _ in m.named_buffers()] == ["rand_weight", "steps"]
    assert set(m.state_dict()) == {"rand_weight", "steps", "linear.weight", "linear.bias"}
    assert m.get_parameter("steps").dtype == "int64"
    # Known difference: jax stores 64-bit types as 32-bit unless jax_enable_x64 is on (README, "Backends").
    narrow = grad_backend == "jax" and not __import__("jax").config.jax_enable_x64
    assert to_np(m.steps).dtype == (np.int32 if narrow else np.int64)
    _, grads = lm.value_and_grad(lambda mod, x: mod(x).sum())(m, rand(2, 3))
    assert set(grads) == {"linear.weight", "linear.bias"}
    np.testing.assert_array_equal(to_np(m.rand_weight), np.arange(6).reshape(2, 3))


class Shared(lm.Module):
    def __init__(self):
        super().__init__()
        self.layer = lm.Linear(4, 4)

    def forward(self, x):
        return self.layer(self.layer(x))


def test_calling_a_child_twice_shares_its_parameters(backend):
    m = Shared()
    assert len(list(m.parameters())) == 2
    x = rand(3, 4)
    W, b = to_np(m.layer.weight), to_np(m.layer.bias)
    np.testing.assert_allclose(to_np(m(x)), (x @ W + b) @ W + b, rtol=1e-4, atol=1e-5)


class Nest(lm.Module):
    def __init__(self):
        super().__init__()
        self.net = lm.Sequential(lm.Linear(64), lm.ReLU(), lm.Linear(32), lm.ReLU())
        self.linear = lm.Linear(16)

    def forward(self, x):
        return self.linear(self.net(x))


def test_arbitrary_nesting(backend):
    chimera = lm.Sequential(Nest(), lm.Linear(20), MyLinear(20, 4))
    assert tuple(chimera(rand(2, 20)).shape) == (2, 4)
    names = [n for n, _ in chimera.named_parameters()]
    assert names[:2] == ["0.net.0.weight", "0.net.0.bias"] and "0.linear.weight" in names
    assert names[-2:] == ["2.weight", "2.bias"]
    mods = [n for n, _ in chimera.named_modules()]
    assert mods[:4] == ["", "0", "0.net", "0.net.0"]
    assert [type(c).__name__ for c in chimera.children()] == ["Nest", "Linear", "MyLinear"]


def test_train_eval_and_apply(backend):
    net = lm.Sequential(lm.Linear(2, 2), lm.Sequential(lm.ReLU()))
    assert all(m.training for m in net.modules())
    net.eval()
    assert not any(m.training for m in net.modules())
    net.train()
    seen = []
    net.apply(lambda m: seen.append(type(m).__name__))
    # children in registration order, each before its parent: what torch.nn.Module.apply does
    torch = pytest.importorskip("torch")
    ref = []
    torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.ReLU())).apply(
        lambda m: ref.append(type(m).__name__))
    assert seen == ref == ["Linear", "ReLU", "Sequential", "Sequential"]


def test_repr_shows_tree_and_shapes(backend):
    net = lm.Sequential(lm.Linear(8), lm.ReLU())
    text = repr(net)
    assert "(0): Linear(? -> 8)  [weight (?, 8), bias (8,)]" in text
    assert "(1): ReLU()" in text
    net(rand(1, 3))
    assert "Linear(3 -> 8)  [weight (3, 8), bias (8,)]" in repr(net)


def test_reassigning_an_attribute_replaces_the_child(backend):
    m = Shared()
    m.layer = lm.Linear(4, 2)
    assert [tuple(p.shape) for p in m.parameters()] == [(4, 2), (2,)]
    m.layer = None
    assert list(m.parameters()) == []


def test_deepcopy_gives_an_independent_model_with_the_same_ties(backend):
    import copy

    shared = lm.Linear(4, 4)
    net = lm.Sequential(lm.Linear(3, 4), shared, lm.ReLU(), shared, lm.BatchNorm1d())
    x = rand(5, 3)
    y = to_np(net(x))
    clone = copy.deepcopy(net)
    assert clone[1] is clone[3] and clone[1] is not shared
    assert clone.get_parameter("3.weight") is clone.get_parameter("1.weight")
    np.testing.assert_array_equal(to_np(clone(x)), y)
    clone[1].weight = np.zeros((4, 4), np.float32)  # changing the copy leaves the original alone
    assert np.abs(to_np(net[1].weight)).sum() > 0
    np.testing.assert_array_equal(to_np(clone[3].weight), 0)
    assert lm.backend_of(clone[0].weight).name == backend
    assert [n for n, _ in clone.named_parameters()] == [n for n, _ in net.named_parameters()]
    if backend == "torch":
        assert clone[0].weight.requires_grad


def test_training_a_deepcopy_leaves_the_original_usable(grad_backend):
    import copy

    net = lm.Sequential(lm.Linear(3, 4), lm.ReLU(), lm.Linear(2))
    x = rand(8, 3)
    y = to_np(net(x))
    clone = copy.deepcopy(net)
    lm.fit(clone, lm.losses.mse, lm.optim.Adam(clone, lr=0.1), (x, np.zeros((8, 2), np.float32)), epochs=3,
           batch_size=4, progress=False)
    np.testing.assert_array_equal(to_np(net(x)), y)  # the original's arrays were neither changed nor donated
    assert not np.allclose(to_np(clone(x)), y)


def test_a_users_own_call_is_kept_in_subclasses(backend):
    class Logged(lm.Module):
        calls = []

        def __call__(self, *args, **kwargs):
            self.calls.append(type(self).__name__)
            return super().__call__(*args, **kwargs)

    class Doubler(Logged):
        def forward(self, x):
            return x * 2

    np.testing.assert_allclose(to_np(Doubler()(np.ones(2, np.float32))), [2, 2])
    assert Logged.calls == ["Doubler"]
