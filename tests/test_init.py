"""The "Initialization" part of the builders' guide, and seeding."""

import math

import numpy as np
import pytest

import lamina as lm

from conftest import BACKENDS, MyLinear, rand, to_np


def big_net():
    return lm.Sequential(lm.Linear(256), lm.ReLU(), lm.Linear(128))


def test_documented_defaults(backend):
    net = big_net()
    net(rand(2, 64))
    w = to_np(net[0].weight)
    bound = 1 / math.sqrt(64)  # Linear: U[-1/sqrt(in), 1/sqrt(in)], bias zeros
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound
    np.testing.assert_array_equal(to_np(net[0].bias), 0)
    tr = lm.TensorReduction(4)
    tr(rand(2, 50))
    assert abs(to_np(tr.weight).std() - 1 / 50) < 0.05 / 50  # TensorReduction: N(0, (1/in)^2)
    p = lm.Parameter((300, 200))  # Parameter: Glorot uniform for 2+ axes, zeros otherwise
    assert np.abs(p.numpy()).max() <= math.sqrt(6 / 500)
    np.testing.assert_array_equal(lm.Parameter((5,)).numpy(), 0)


def test_reinitialize_dense_layers_with_apply(backend):
    net = big_net()
    net(rand(2, 64))

    def init_normal(m):
        if isinstance(m, lm.Linear):
            m.reinitialize(weight=lm.init.normal(0, 0.01), bias=lm.init.zeros())

    net.apply(init_normal)
    w = to_np(net[0].weight)
    assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.01) < 5e-4
    np.testing.assert_array_equal(to_np(net[2].bias), 0)
    net.reinitialize(lm.init.constant(1.0))
    for p in net.parameters():
        np.testing.assert_array_equal(p.numpy(), 1.0)


def test_xavier_and_kaiming_follow_their_formulas(backend):
    net = big_net()
    net(rand(2, 64))
    net[0].reinitialize(weight=lm.init.xavier_uniform())
    w = to_np(net[0].weight)
    a = math.sqrt(6 / (64 + 256))
    assert np.abs(w).max() <= a and np.abs(w).max() > 0.98 * a
    assert abs(w.std() - a / math.sqrt(3)) < 0.03 * a
    net[2].reinitialize(weight=lm.init.kaiming_normal())
    assert abs(to_np(net[2].weight).std() - math.sqrt(2 / 256)) < 0.03 * math.sqrt(2 / 256)
    net[2].reinitialize(weight=lm.init.xavier_normal())
    assert abs(to_np(net[2].weight).std() - math.sqrt(2 / (256 + 128))) < 0.03 * math.sqrt(2 / 384)
    net[2].reinitialize(weight=lm.init.kaiming_uniform())
    b = math.sqrt(3) * math.sqrt(2 / 256)
    assert np.abs(to_np(net[2].weight)).max() <= b


def test_initializers_match_torch_nn_init_statistics():
    torch = pytest.importorskip("torch", reason="torch not installed")
    t = torch.empty(400, 300)
    ours = lm.init.kaiming_uniform(a=math.sqrt(5), nonlinearity="leaky_relu")((300, 400), np.random.default_rng(0))
    torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # torch's layout is (out, in): same fan_in = 300
    assert abs(ours.max() - float(t.max())) < 2e-3 and abs(ours.std() - float(t.std())) < 1e-3


def test_per_block_initialization(backend):
    net = big_net()
    net(rand(2, 64))
    net[0].reinitialize(lm.init.xavier_uniform())
    net[2].reinitialize(lm.init.constant(42))
    assert np.abs(to_np(net[0].weight)).max() <= math.sqrt(6 / 320)
    np.testing.assert_array_equal(to_np(net[2].weight), 42)
    np.testing.assert_array_equal(to_np(net[2].bias), 42)


def test_user_written_initializer(backend):
    def my_init(shape, rng):
        w = rng.uniform(-10, 10, shape)
        w[np.abs(w) < 5] = 0
        return w

    net = big_net()
    net(rand(2, 64))
    net.apply(lambda m: m.reinitialize(weight=my_init) if isinstance(m, lm.Linear) else None)
    w = to_np(net[0].weight)
    nonzero = w[w != 0]
    assert np.all(np.abs(nonzero) >= 5) and np.all(np.abs(w) <= 10)
    assert 0.4 < (w == 0).mean() < 0.6  # half of U(-10, 10) lies in (-5, 5)


def test_reinitialize_before_shapes_are_known_raises_and_changes_nothing(backend):
    net = lm.Sequential(lm.Linear(4, 3), lm.Linear(2))
    before = to_np(net[0].weight).copy()
    with pytest.raises(lm.UninitializedParameterError, match=r"'1\.weight'.*model\.build\(input_shape\)"):
        net.reinitialize(lm.init.constant(1))
    np.testing.assert_array_equal(to_np(net[0].weight), before)  # all or nothing
    net.build((None, 4))
    net.reinitialize(lm.init.constant(1))
    np.testing.assert_array_equal(to_np(net[1].weight), 1)


def test_reinitialize_with_unknown_name_raises(backend):
    with pytest.raises(ValueError, match=r"no parameter named \['kernel'\]"):
        lm.Linear(2, 2).reinitialize(kernel=lm.init.zeros())


def test_reinitialize_draws_new_values(backend):
    layer = lm.Linear(20, 20)
    first = to_np(layer.weight).copy()
    layer.reinitialize()
    assert not np.allclose(first, to_np(layer.weight))


def values_of(net):
    return {k: to_np(v).copy() for k, v in net.state_dict().items()}


def test_manual_seed_is_reproducible_and_models_differ(backend):
    lm.manual_seed(7)
    a = values_of(MyLinear(5, 3))
    b = values_of(MyLinear(5, 3))
    lm.manual_seed(7)
    a2 = values_of(MyLinear(5, 3))
    assert all(np.array_equal(a[k], a2[k]) for k in a)
    assert not np.allclose(a["weight"], b["weight"])  # two models built one after the other differ


def test_same_seed_gives_identical_weights_on_every_backend():
    results = []
    for name in BACKENDS:
        lm.set_backend(name)
        lm.manual_seed(3)
        net = lm.Sequential(lm.Linear(16), lm.ReLU(), MyLinear(16, 4), lm.TensorReduction(2))
        net(rand(2, 8))
        results.append(values_of(net))
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for k in other:
            np.testing.assert_array_equal(other[k], results[0][k])


class TwoBranches(lm.Module):
    def __init__(self, reverse):
        super().__init__()
        self.a, self.b, self.reverse = lm.Linear(4), lm.Linear(4), reverse

    def forward(self, x):
        return (self.b(x) + self.a(x)) if self.reverse else (self.a(x) + self.b(x))


def test_initial_values_do_not_depend_on_build_order(backend):
    lm.manual_seed(11)
    first = TwoBranches(reverse=False)
    first(rand(2, 3))
    lm.manual_seed(11)
    second = TwoBranches(reverse=True)  # builds b before a
    second(rand(2, 3))
    v1, v2 = values_of(first), values_of(second)
    for k in v1:
        np.testing.assert_array_equal(v1[k], v2[k])
    assert not np.allclose(v1["a.weight"], v1["b.weight"])  # distinct paths, distinct streams
