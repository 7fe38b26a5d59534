"""Weights from PyTorch (issue 9): ``lm.load_torch`` maps names and layouts so that a Lamina model computes
what the torch.nn original computes; the plain ``load_state_dict`` path converts a torch state dict too.
References: the torch.nn modules themselves."""

import numpy as np
import pytest

import lamina as lm

from conftest import rand, to_np

torch = pytest.importorskip("torch", reason="the references are torch.nn modules")


def torch_out(module, *xs):
    module.eval()
    with torch.no_grad():
        y = module(*[torch.from_numpy(x) for x in xs])
    return (y[0] if isinstance(y, tuple) else y).numpy()


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(to_np(a), b, rtol=tol, atol=tol)


def test_square_linear_from_a_torch_state_dict_is_transposed(backend):
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 4)
    layer = lm.Linear(4, 4)
    # a square weight fits either layout: before, this loaded (out, in) as (in, out) and computed x @ W
    layer.load_state_dict(ref.state_dict())
    x = rand(3, 4)
    close(layer(x), torch_out(ref, x))
    np.testing.assert_array_equal(to_np(layer.weight), ref.weight.detach().numpy().T)
    # a plain dict of Lamina's own layout is loaded as it is (nothing to tell apart)
    again = lm.Linear(4, 4).load_state_dict({k: to_np(v) for k, v in layer.state_dict().items()})
    close(again(x), torch_out(ref, x))


def test_mlp(backend):
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                              torch.nn.Linear(64, 10))
    net = lm.Sequential(lm.Linear(64), lm.ReLU(), lm.Linear(64), lm.GELU(), lm.Linear(10))  # lazy: shapes from torch
    assert lm.load_torch(net, ref) is net
    x = rand(8, 20)
    close(net(x), torch_out(ref, x))


def test_cnn_with_batchnorm_running_statistics(backend):
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 10))
    ref.train()
    for _ in range(3):  # running statistics and num_batches_tracked that are not the defaults
        ref(torch.randn(16, 1, 8, 8))
    net = lm.Sequential(lm.Conv2d(1, 4, 3, padding=1), lm.BatchNorm2d(), lm.ReLU(), lm.MaxPool2d(2), lm.Flatten(),
                        lm.Linear(10))
    lm.load_torch(net, ref.state_dict())
    assert int(to_np(net[1].num_batches_tracked)) == 3
    x = rand(5, 1, 8, 8)
    net.eval()
    close(net(x), torch_out(ref, x), tol=1e-4)


class TorchTagger(torch.nn.Module):
    def __init__(self, vocab, dim, hidden, tags):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.lstm = torch.nn.LSTM(dim, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.norm = torch.nn.LayerNorm(2 * hidden)
        self.out = torch.nn.Linear(2 * hidden, tags)

    def forward(self, tokens):
        h, _ = self.lstm(self.embed(tokens))
        return self.out(self.norm(h))


class Tagger(lm.Module):
    def __init__(self, vocab, dim, hidden, tags):
        super().__init__()
        self.embed = lm.Embedding(vocab, dim)
        self.lstm = lm.LSTM(dim, hidden, num_layers=2, bidirectional=True)
        self.norm = lm.LayerNorm()
        self.out = lm.Linear(tags)

    def forward(self, tokens):
        h, _ = self.lstm(self.embed(tokens))
        return self.out(self.norm(h))


def test_lstm_tagger(backend):
    torch.manual_seed(0)
    ref = TorchTagger(30, 8, 6, 5)
    net = lm.load_torch(Tagger(30, 8, 6, 5), ref)
    tokens = np.random.default_rng(0).integers(0, 30, (4, 9))
    close(net(tokens), torch_out(ref, tokens), tol=1e-4)


class TorchBlock(torch.nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln1 = torch.nn.LayerNorm(d)
        self.ff = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.ReLU(), torch.nn.Linear(2 * d, d))
        self.ln2 = torch.nn.LayerNorm(d)

    def forward(self, x):
        y = self.ln1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.ln2(y + self.ff(y))


class Block(lm.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn = lm.MultiHeadAttention(d, heads)
        self.ln1 = lm.LayerNorm()
        self.ff = lm.Sequential(lm.Linear(2 * d), lm.ReLU(), lm.Linear(d))
        self.ln2 = lm.LayerNorm()

    def forward(self, x):
        y = self.ln1(x + self.attn(x))
        return self.ln2(y + self.ff(y))


def test_multi_head_attention_block(backend):
    torch.manual_seed(0)
    ref = TorchBlock(8, 2)
    net = Block(8, 2)
    net.load_state_dict(ref.state_dict())  # the plain path converts a torch state dict as load_torch does
    x = rand(3, 5, 8)
    close(net(x), torch_out(ref, x), tol=1e-4)


def test_separate_qkv_projections_are_stacked(backend):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    state = dict(ref.state_dict())
    w = state.pop("in_proj_weight")
    state.update(q_proj_weight=w[:8], k_proj_weight=w[8:16], v_proj_weight=w[16:])
    layer = lm.load_torch(lm.MultiHeadAttention(8, 2), state)
    x = rand(2, 4, 8)
    close(layer(x), torch_out(ref, x, x, x), tol=1e-4)


def test_a_users_layer_declares_its_own_mapping(backend):
    class MyLinear(lm.Module):  # the textbook's layout, plus a hook that says how torch's differs
        def __init__(self, in_units, units):
            super().__init__()
            self.weight = lm.Parameter((in_units, units), init=lm.init.normal())
            self.bias = lm.Parameter((units,), init=lm.init.normal())

        def forward(self, X):
            return lm.ops.relu(X @ self.weight + self.bias)

        def from_torch_state(self, state):
            state["weight"] = state["weight"].T
            return state

    class Outer(lm.Module):  # a parent's hook sees only what its children left
        def __init__(self):
            super().__init__()
            self.inner = MyLinear(4, 3)
            self.temp = lm.Parameter((1,), init=lm.init.ones())
            self.seen = None

        def forward(self, x):
            return self.inner(x) * self.temp

        def from_torch_state(self, state):
            self.seen = sorted(state)
            state["temp"] = state.pop("temperature")
            return state

    torch.manual_seed(0)
    ref = torch.nn.Module()
    ref.inner = torch.nn.Linear(4, 3)
    ref.temperature = torch.nn.Parameter(torch.tensor([2.0]))
    net = Outer()
    lm.load_torch(net, ref)
    assert net.seen == ["temperature"]
    x = rand(2, 4)
    close(net(x), np.maximum(torch_out(ref.inner, x), 0) * 2.0)


def test_errors_name_the_layer_and_load_torch(backend):
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(3, 4))
    bad = ref.state_dict()
    bad["0.weight"] = torch.zeros(2, 3, 4)
    with pytest.raises(lm.CheckpointError, match=r"layer '0' \(Linear\).*\(out_features, in_features\)"):
        lm.load_torch(lm.Sequential(lm.Linear(4)), bad)
    with pytest.raises(lm.CheckpointError, match="extra"):  # strict: a torch key the model lacks is reported
        net = lm.Sequential(lm.Linear(4))
        state = ref.state_dict()
        state["extra.weight"] = torch.zeros(1)
        lm.load_torch(net, state)
    with pytest.raises(TypeError, match=r"load_torch\(model, source\)"):
        lm.load_torch(lm.Linear(3), 42)
