"""The habits PyTorch users bring to layers (issue 9): Sequential from a mapping and attribute-assigned
layers that run, torch-consistent constructor signatures, bidirectional and time-major recurrent layers.
References: torch.nn with the same weights."""

from collections import OrderedDict

import numpy as np
import pytest

import lamina as lm

from conftest import rand, to_np

torch = pytest.importorskip("torch", reason="the references are torch.nn layers")


def torch_out(module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def flat(y):
    return [a for item in y for a in flat(item)] if isinstance(y, tuple | list) else [y]


# ----- Sequential ---------------------------------------------------------------------------------------
def test_sequential_from_ordered_mapping_keeps_names_and_matches_torch(backend):
    ref = torch.nn.Sequential(OrderedDict(conv=torch.nn.Conv1d(2, 3, 3), act=torch.nn.ReLU(),
                                          flat=torch.nn.Flatten(), fc=torch.nn.Linear(3 * 6, 4)))
    net = lm.Sequential(OrderedDict(conv=lm.Conv1d(2, 3, 3), act=lm.ReLU(), flat=lm.Flatten(), fc=lm.Linear(4)))
    x = rand(5, 2, 8)
    lm.load_torch(net, ref)
    assert list(net.state_dict()) == list(ref.state_dict()) == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    np.testing.assert_allclose(to_np(net(x)), torch_out(ref, x), rtol=1e-5, atol=1e-6)
    assert net["fc"] is net[3]
    # a plain dict works too, and a slice keeps the names
    d = lm.Sequential({"a": lm.Linear(2, 3), "b": lm.ReLU()})
    assert [n for n, _ in d.named_children()] == ["a", "b"]
    assert [n for n, _ in d[1:].named_children()] == ["b"]


def test_layer_assigned_to_a_sequential_runs_in_registration_order(backend):
    ref = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
    ref.extra = torch.nn.Linear(4, 2)  # torch runs it after the others
    net = lm.Sequential(lm.Linear(4), lm.Tanh())
    net.extra = lm.Linear(2)
    x = rand(6, 3)
    lm.load_torch(net, ref)
    assert list(net.state_dict()) == ["0.weight", "0.bias", "extra.weight", "extra.bias"]
    y = net(x)
    assert tuple(y.shape) == (6, 2)  # before the fix: (6, 4), the extra layer silently never ran
    np.testing.assert_allclose(to_np(y), torch_out(ref, x), rtol=1e-5, atol=1e-6)
    assert len(net) == 3 and net[2] is net.extra
    # re-assigning an existing name keeps its place (torch's too); deleting it stops running it
    first = lm.Linear(3, 4)
    setattr(net, "0", first)
    assert list(net)[0] is first and net[2] is net.extra
    del net.extra
    assert tuple(net(x).shape) == (6, 4)
    net.add_module("head", lm.Linear(1))
    assert tuple(net(x).shape) == (6, 1)


def test_sequential_runs_a_repeated_layer_each_time(backend):
    shared = lm.Linear(3, 3)
    net = lm.Sequential(shared, lm.ReLU(), shared)
    x = rand(2, 3)
    w, b = to_np(shared.weight), to_np(shared.bias)
    h = np.maximum(x @ w + b, 0)
    np.testing.assert_allclose(to_np(net(x)), h @ w + b, rtol=1e-5, atol=1e-6)


def test_sequential_rejects_non_layers():
    with pytest.raises(TypeError, match="Sequential holds layers"):
        lm.Sequential(OrderedDict(a=lm.ReLU(), b=3))


# ----- constructor signatures ----------------------------------------------------------------------------
@pytest.mark.parametrize("cls,x_shape", [("Conv1d", (2, 1, 20)), ("Conv2d", (2, 1, 12, 12))])
def test_conv_takes_torch_order_with_in_channels(backend, cls, x_shape):
    tcls, lcls = getattr(torch.nn, cls), getattr(lm, cls)
    ref = tcls(1, 25, 5, stride=2)
    layer = lcls(1, 25, 5, stride=2)  # before: a TypeError naming the private _ConvNd
    assert layer.in_channels == 1 and layer.out_channels == 25 and layer.get_parameter("weight").is_built
    lm.load_torch(layer, ref)
    x = rand(*x_shape)
    np.testing.assert_allclose(to_np(layer(x)), torch_out(ref, x), rtol=1e-4, atol=1e-5)
    lazy = lcls(25, 5, stride=2)  # (out, kernel): in_channels inferred, like Linear(out)
    assert lazy.in_channels is None and lazy.out_channels == 25


@pytest.mark.parametrize("args,kwargs,match", [
    ((4,), {}, r"Conv1d takes \(out_channels, kernel_size\) or \(in_channels, out_channels, kernel_size\)"),
    ((1, 4, 3, 1), {}, "Conv1d takes .* every other option is keyword-only"),
    ((1, 4, 3), {"in_channels": 1}, "Conv1d: in_channels given twice"),
    ((4, 3), {"strides": 2}, r"Conv1d\(\) got unexpected keyword argument\(s\) 'strides'"),
])
def test_conv_wrong_arity_names_the_public_class(args, kwargs, match):
    with pytest.raises(TypeError, match=match) as e:
        lm.Conv1d(*args, **kwargs)
    assert "_ConvNd" not in str(e.value)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_recurrent_positional_sizes_mean_what_torch_means(kind):
    layer = getattr(lm, kind)(1, 6)  # before: six layers of hidden size 1
    assert (layer.input_size, layer.hidden_size, layer.num_layers) == (1, 6, 1)
    assert tuple(layer.get_parameter("weight_hh_l0").shape) == tuple(
        getattr(torch.nn, kind)(1, 6).weight_hh_l0.shape)
    lazy = getattr(lm, kind)(6, num_layers=2)
    assert (lazy.input_size, lazy.hidden_size, lazy.num_layers) == (None, 6, 2)
    kw = getattr(lm, kind)(input_size=3, hidden_size=5)
    assert (kw.input_size, kw.hidden_size) == (3, 5)
    with pytest.raises(TypeError, match=rf"{kind} takes \(hidden_size\) or \(input_size, hidden_size\)"):
        getattr(lm, kind)(1, 6, 2)  # num_layers positionally: keyword-only now
    with pytest.raises(TypeError, match=rf"{kind} needs hidden_size"):
        getattr(lm, kind)()
    with pytest.raises(TypeError, match=rf"{kind}\(\) got unexpected keyword argument\(s\) 'dropout'"):
        getattr(lm, kind)(4, dropout=0.5)


# ----- recurrent: bidirectional, batch_first ---------------------------------------------------------------
CASES = [(kind, bi, layers, bf) for kind in ("RNN", "GRU", "LSTM") for bi in (False, True) for layers in (1, 2)
         for bf in (True, False) if bf or (bi and layers == 2)]


def _pair(kind, bi, layers, bf):
    ref = getattr(torch.nn, kind)(5, 4, num_layers=layers, bidirectional=bi, batch_first=bf)
    layer = getattr(lm, kind)(4, num_layers=layers, bidirectional=bi, batch_first=bf)  # input size inferred
    layer.load_state_dict(ref.state_dict())  # torch's names: weight_ih_l0_reverse, ...
    return layer, ref


@pytest.mark.parametrize("kind,bi,layers,bf", CASES,
                         ids=[f"{k}-{'bi' if b else 'uni'}-{n}l-{'bf' if f else 'tm'}" for k, b, n, f in CASES])
def test_recurrent_matches_torch(backend, kind, bi, layers, bf):
    layer, ref = _pair(kind, bi, layers, bf)
    assert [k for k, _ in layer.named_parameters()] == [k for k, _ in ref.named_parameters()]
    x = rand(3, 7, 5) if bf else rand(7, 3, 5)
    ours, theirs = flat(layer(x)), flat(ref(torch.from_numpy(x)))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert tuple(a.shape) == tuple(b.shape)
        np.testing.assert_allclose(to_np(a), b.detach().numpy(), rtol=1e-5, atol=1e-5)
    # a given initial state is used, laid out (num_layers * directions, N, H) as torch's
    h0 = rand(layers * (2 if bi else 1), 3, 4, seed=3)
    state = (h0, h0 * 0.5) if kind == "LSTM" else h0
    tstate = tuple(torch.from_numpy(s) for s in state) if kind == "LSTM" else torch.from_numpy(state)
    np.testing.assert_allclose(to_np(layer(x, state)[0]), ref(torch.from_numpy(x), tstate)[0].detach().numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_bidirectional_gradients_match_torch(grad_backend, kind):
    layer, ref = _pair(kind, True, 2, True)
    x = rand(3, 6, 5)
    out_ref = ref(torch.from_numpy(x))[0]
    r = rand(*out_ref.shape, seed=7)
    b = lm.get_backend()
    _, grads = lm.value_and_grad(lambda m, v: (m(v)[0] * b.from_numpy(r)).sum())(layer, x)
    (out_ref * torch.from_numpy(r)).sum().backward()
    for k, p in ref.named_parameters():
        np.testing.assert_allclose(to_np(grads[k]), p.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=k)


def test_bidirectional_state_of_the_wrong_size_is_explained(backend):
    layer = lm.GRU(5, 4, bidirectional=True)
    with pytest.raises(lm.ShapeError, match=r"2 \* num_layers, N, hidden_size\) = \(2, 3, 4\)"):
        layer(rand(3, 7, 5), rand(1, 3, 4))


# ----- torch's keyword names, where the concepts coincide (adversarial review, item 2) ---------------------
def test_torch_keywords_mean_what_they_mean_in_torch(backend):
    torch = pytest.importorskip("torch")
    torch_nn = torch.nn
    x = rand(2, 3)
    lin = lm.Linear(in_features=3, out_features=4)
    ref = torch_nn.Linear(in_features=3, out_features=4)
    assert lin.in_features == ref.in_features and lin.out_features == ref.out_features
    assert lm.Linear(3, out_features=4).in_features == 3 and lm.Linear(out_features=4)(x).shape == (2, 4)
    assert lm.Linear(3, 4, bias=False).extra_repr().endswith("bias=False")
    emb = lm.Embedding(num_embeddings=10, embedding_dim=5)
    assert emb.get_parameter("weight").shape == tuple(torch_nn.Embedding(num_embeddings=10, embedding_dim=5)
                                                      .weight.shape)
    ln = lm.LayerNorm(normalized_shape=3)
    assert ln(x).shape == (2, 3) and ln.get_parameter("weight").shape == (3,)
    assert lm.LayerNorm(normalized_shape=(3,)).get_parameter("weight").shape == (3,)
    assert lm.Dropout(p=0.25).rate == torch_nn.Dropout(p=0.25).p
    img = rand(1, 2, 5, 5)
    for conv in (lm.Conv2d(out_channels=4, kernel_size=3), lm.Conv2d(2, out_channels=4, kernel_size=3),
                 lm.Conv2d(2, 4, kernel_size=3), lm.Conv2d(in_channels=2, out_channels=4, kernel_size=3),
                 lm.Conv2d(4, kernel_size=3)):
        assert conv(img).shape == tuple(torch_nn.Conv2d(2, 4, 3)(torch.zeros(1, 2, 5, 5)).shape)
        assert conv.in_channels == 2 and conv.kernel_size == (3, 3)


@pytest.mark.parametrize("make, match", [
    (lambda: lm.Linear(3, 4, False), r"options are keyword-only: Linear\(3, 4, bias=False\)"),
    (lambda: lm.Linear(3, 4, in_features=3), "Linear takes"),
    (lambda: lm.Embedding(10, 4, embedding_dim=4), "dim or embedding_dim"),
    (lambda: lm.Dropout(0.1, p=0.2), "rate or p"),
    (lambda: lm.LayerNorm(3, normalized_shape=3), "features or normalized_shape"),
    (lambda: lm.Conv2d(2, out_channels=4), "out_channels and kernel_size once each"),
    (lambda: lm.Conv2d(2, 4, 3, kernel_size=3), "out_channels and kernel_size once each"),
])
def test_torch_keywords_given_twice_or_options_given_positionally_are_explained(make, match):
    with pytest.raises(TypeError, match=match):
        make()


# ----- Sequential editing as torch.nn.Sequential (adversarial review, item 3) -----------------------------
def _keys(m):
    return list(m.state_dict())


def test_sequential_insert_pop_setitem_delitem_match_torch(backend):
    torch = pytest.importorskip("torch")
    tn = torch.nn
    ours = lm.Sequential(lm.Linear(3, 4), lm.ReLU(), lm.Linear(4, 2))
    ref = tn.Sequential(tn.Linear(3, 4), tn.ReLU(), tn.Linear(4, 2))
    x = rand(5, 3)

    ours.insert(1, lm.Linear(4, 4))
    ref.insert(1, tn.Linear(4, 4))
    assert _keys(ours) == list(ref.state_dict())  # renumbered as torch: 0, 1 (new), 2 (ReLU), 3
    assert ours(x).shape == (5, 2) and isinstance(ours[2], lm.ReLU)

    ours[1] = lm.Linear(4, 4, bias=False)
    ref[1] = tn.Linear(4, 4, bias=False)
    assert _keys(ours) == list(ref.state_dict())

    popped, ref_popped = ours.pop(1), ref.pop(1)
    assert isinstance(popped, lm.Linear) and isinstance(ref_popped, tn.Linear)
    assert _keys(ours) == list(ref.state_dict()) and len(ours) == len(ref) == 3

    del ours[0]
    del ref[0]
    assert _keys(ours) == list(ref.state_dict()) == ["1.weight", "1.bias"]
    assert [name for name, _ in ours.named_children()] == ["0", "1"]
    np.testing.assert_allclose(to_np(ours(rand(5, 4))), to_np(ours[1](np.maximum(0, rand(5, 4)))), rtol=1e-6)

    ours.insert(-1, lm.Identity())
    ref.insert(-1, tn.Identity())
    assert [type(m).__name__ for m in ours] == [type(m).__name__ for m in ref]
    assert _keys(ours) == list(ref.state_dict())
    ours.insert(len(ours), lm.Identity())
    assert isinstance(ours[-1], lm.Identity)


def test_sequential_slice_delete_and_bad_indices():
    seq = lm.Sequential(*[lm.Linear(2, 2) for _ in range(5)])
    third = seq[3]
    del seq[1:3]
    assert len(seq) == 3 and seq[1] is third and [n for n, _ in seq.named_children()] == ["0", "1", "2"]
    with pytest.raises(IndexError, match="out of range"):
        seq.insert(9, lm.ReLU())
    with pytest.raises(IndexError, match="out of range"):
        del seq[7]
    with pytest.raises(TypeError, match="lm.Module"):
        seq[0] = "relu"
