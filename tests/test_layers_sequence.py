"""RNN, GRU, LSTM and MultiHeadAttention against torch.nn with the same weights."""

import numpy as np
import pytest

import lamina as lm

from conftest import GRAD_BACKENDS, to_np

torch = pytest.importorskip("torch", reason="the references are torch.nn layers")

RECURRENT = {
    "RNN": (lambda: lm.RNN(4, num_layers=2), lambda: torch.nn.RNN(5, 4, num_layers=2, batch_first=True)),
    "RNN relu": (lambda: lm.RNN(3, nonlinearity="relu"),
                 lambda: torch.nn.RNN(5, 3, nonlinearity="relu", batch_first=True)),
    "GRU": (lambda: lm.GRU(4, num_layers=2), lambda: torch.nn.GRU(5, 4, num_layers=2, batch_first=True)),
    "LSTM": (lambda: lm.LSTM(4, num_layers=2), lambda: torch.nn.LSTM(5, 4, num_layers=2, batch_first=True)),
    "LSTM no bias": (lambda: lm.LSTM(3, bias=False), lambda: torch.nn.LSTM(5, 3, bias=False, batch_first=True)),
}


def seq(shape=(3, 7, 5), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def flat(y):
    return [a for item in y for a in flat(item)] if isinstance(y, tuple | list) else [y]


def recurrent_pair(name):
    make, make_ref = RECURRENT[name]
    layer, ref = make(), make_ref()
    layer.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})  # torch's names
    return layer, ref


@pytest.mark.parametrize("name", list(RECURRENT))
def test_recurrent_forward_and_state_match_torch(backend, name):
    layer, ref = recurrent_pair(name)
    x = seq()
    ours, theirs = flat(layer(x)), flat(ref(torch.from_numpy(x)))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(to_np(a), b.detach().numpy(), rtol=1e-5, atol=1e-6)
    # a given initial state is used
    h0 = seq((layer.num_layers, 3, layer.hidden_size), seed=4)
    state = (h0, h0 * 0.5) if "LSTM" in name else h0
    tstate = tuple(torch.from_numpy(s) for s in state) if "LSTM" in name else torch.from_numpy(state)
    np.testing.assert_allclose(to_np(layer(x, state)[0]), ref(torch.from_numpy(x), tstate)[0].detach().numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(RECURRENT))
def test_recurrent_gradients_match_torch(grad_backend, name):
    layer, ref = recurrent_pair(name)
    x = seq()
    out_ref = ref(torch.from_numpy(x))[0]
    r = np.random.default_rng(3).standard_normal(tuple(out_ref.shape)).astype(np.float32)
    b = lm.get_backend()
    _, grads = lm.value_and_grad(lambda m, v: (m(v)[0] * b.from_numpy(r)).sum())(layer, x)
    (out_ref * torch.from_numpy(r)).sum().backward()
    for k, p in ref.named_parameters():
        np.testing.assert_allclose(to_np(grads[k]), p.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.skipif("jax" not in GRAD_BACKENDS, reason="jax not installed")
def test_jax_program_does_not_grow_with_sequence_length():
    import jax

    lm.set_backend("jax")
    layer = lm.LSTM(4, num_layers=2)
    layer.build((2, 3, 5))
    params = layer.state_dict()
    programs = [jax.make_jaxpr(lambda p, v: lm.functional_call(layer, p, v)[0])(params, seq((2, t, 5)))
                for t in (3, 60)]
    counts = [len(pr.jaxpr.eqns) for pr in programs]
    assert counts[0] == counts[1] < 40  # the time loop is one lax.scan per layer, not unrolled
    assert sum(eq.primitive.name == "scan" for eq in programs[1].jaxpr.eqns) == 2


def attention_pair():
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        ref.in_proj_bias.normal_()
        ref.out_proj.bias.normal_()
    layer = lm.MultiHeadAttention(8, 2)
    layer.load_state_dict({"in_proj_weight": ref.in_proj_weight.detach().numpy(),
                           "in_proj_bias": ref.in_proj_bias.detach().numpy(),
                           "out_proj_weight": ref.out_proj.weight.detach().numpy(),
                           "out_proj_bias": ref.out_proj.bias.detach().numpy()})
    return layer, ref


def test_attention_matches_torch_with_masks(backend):
    layer, ref = attention_pair()
    q, kv = seq((2, 5, 8)), seq((2, 6, 8), seed=1)
    kpm = np.zeros((2, 6), bool)
    kpm[0, 4:] = True
    tq, tkv = torch.from_numpy(q), torch.from_numpy(kv)
    cross = ref(tq, tkv, tkv, key_padding_mask=torch.from_numpy(kpm), need_weights=False)[0]
    np.testing.assert_allclose(to_np(layer(q, kv, kv, key_padding_mask=kpm)), cross.detach().numpy(), rtol=1e-5,
                               atol=1e-5)
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    self_causal = ref(tq, tq, tq, attn_mask=causal, need_weights=False)[0]
    np.testing.assert_allclose(to_np(layer(q, causal=True)), self_causal.detach().numpy(), rtol=1e-5, atol=1e-5)
    plain = ref(tq, tq, tq, need_weights=False)[0]
    np.testing.assert_allclose(to_np(layer(q)), plain.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_attention_gradients_match_torch(grad_backend):
    layer, ref = attention_pair()
    q = seq((2, 5, 8))
    r = seq((2, 5, 8), seed=2)
    b = lm.get_backend()
    _, grads = lm.value_and_grad(lambda m, v: (m(v, causal=True) * b.from_numpy(r)).sum())(layer, q)
    tq = torch.from_numpy(q)
    out = ref(tq, tq, tq, attn_mask=torch.triu(torch.ones(5, 5, dtype=torch.bool), 1), need_weights=False)[0]
    (out * torch.from_numpy(r)).sum().backward()
    np.testing.assert_allclose(to_np(grads["in_proj_weight"]), ref.in_proj_weight.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_np(grads["out_proj_weight"]), ref.out_proj.weight.grad.numpy(), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("make", [lambda: lm.RNN(4, num_layers=2), lambda: lm.GRU(3),
                                  lambda: lm.LSTM(3, num_layers=2),
                                  lambda: lm.MultiHeadAttention(6, 3)], ids=["RNN", "GRU", "LSTM", "MHA"])
def test_check_layer_passes(backend, make):
    layer = make()
    shape = (2, 5, 6) if isinstance(layer, lm.MultiHeadAttention) else (2, 5, 3)
    lm.testing.check_layer(layer, shape)


class Tagger(lm.Module):
    """A user's sequence model: embedding, LSTM, attention, linear head."""

    def __init__(self):
        super().__init__()
        self.embed = lm.Embedding(20, 8)
        self.lstm = lm.LSTM(8)
        self.attn = lm.MultiHeadAttention(8, 2)
        self.norm = lm.LayerNorm()
        self.head = lm.Linear(3)

    def forward(self, tokens):
        h, _ = self.lstm(self.embed(tokens))
        return self.head(self.norm(h + self.attn(h, causal=True)))


@pytest.mark.skipif(not GRAD_BACKENDS, reason="needs a backend that trains")
def test_a_sequence_model_trains_and_saves(grad_backend, tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 20, (64, 6))
    labels = tokens % 3  # learnable: each position's label depends on its own token
    net = Tagger()

    def loss(out, y):
        return lm.losses.cross_entropy(out.reshape(-1, 3), y.reshape(-1))

    history = lm.fit(net, loss, lm.optim.Adam(net, lr=0.02), (tokens, labels), epochs=15, batch_size=16,
                     progress=False)
    assert history["loss"][-1] < 0.3 * history["loss"][0]
    lm.save(net, tmp_path / "tagger.safetensors")
    clone = Tagger()
    lm.load_into(clone, tmp_path / "tagger.safetensors")
    np.testing.assert_array_equal(to_np(clone(tokens[:4])), to_np(net(tokens[:4])))
