"""Convolution, pooling, normalization and embedding layers against torch.nn with the same weights."""

import numpy as np
import pytest

import lamina as lm

from conftest import to_np

torch = pytest.importorskip("torch", reason="the references are torch.nn layers")
nn = torch.nn

CASES = {
    "Conv1d padding=1": (lambda: lm.Conv1d(4, 3, padding=1), lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 10)),
    "Conv1d same dilated": (lambda: lm.Conv1d(5, 4, padding="same", dilation=2),
                            lambda: nn.Conv1d(3, 5, 4, padding="same", dilation=2), (2, 3, 11)),
    "Conv2d stride groups": (lambda: lm.Conv2d(6, 3, stride=2, padding=1, groups=3),
                             lambda: nn.Conv2d(3, 6, 3, 2, 1, groups=3), (2, 3, 9, 8)),
    "Conv2d rect no bias": (lambda: lm.Conv2d(4, (2, 3), bias=False, dilation=(2, 1), padding="valid"),
                            lambda: nn.Conv2d(3, 4, (2, 3), dilation=(2, 1), bias=False), (2, 3, 7, 6)),
    "Conv2d same even kernel": (lambda: lm.Conv2d(2, 4, padding="same"), lambda: nn.Conv2d(3, 2, 4, padding="same"),
                                (1, 3, 6, 5)),
    "MaxPool1d": (lambda: lm.MaxPool1d(3, 2, 1), lambda: nn.MaxPool1d(3, 2, 1), (2, 3, 10)),
    "MaxPool2d": (lambda: lm.MaxPool2d(2), lambda: nn.MaxPool2d(2), (2, 3, 8, 6)),
    "AvgPool1d": (lambda: lm.AvgPool1d(2, 1), lambda: nn.AvgPool1d(2, 1), (2, 3, 7)),
    "AvgPool2d padded": (lambda: lm.AvgPool2d(3, 2, 1), lambda: nn.AvgPool2d(3, 2, 1), (2, 3, 9, 8)),
    "GlobalAvgPool": (lambda: lm.GlobalAvgPool(), lambda: nn.AdaptiveAvgPool2d(1), (2, 3, 5, 4)),
    "LayerNorm": (lambda: lm.LayerNorm(), lambda: nn.LayerNorm(7), (3, 4, 7)),
    "RMSNorm": (lambda: lm.RMSNorm(), lambda: nn.RMSNorm(7, eps=1e-6), (3, 7)),
    "Embedding": (lambda: lm.Embedding(10, 4), lambda: nn.Embedding(10, 4), (3, 5)),
}


def inputs(name, shape, seed=0):
    rng = np.random.default_rng(seed)
    if name == "Embedding":
        return rng.integers(0, 10, shape)
    return rng.standard_normal(shape).astype(np.float32)


def pair(name):
    """The lamina layer (built) and the torch layer with the same (randomized) weights."""
    make, make_ref, shape = CASES[name]
    layer, ref = make(), make_ref()
    x = inputs(name, shape)
    layer.build(shape)
    rng = np.random.default_rng(1)
    for k, p in layer.named_parameters():
        p.value = rng.standard_normal(p.shape).astype(np.float32) * 0.5 + (1.0 if "Norm" in name else 0.0)
        getattr(ref, k).data = torch.from_numpy(p.numpy().copy())
    return layer, ref, x


def torch_out(name, ref, x):
    t = torch.from_numpy(x)
    out = ref(t)
    return out.reshape(out.shape[:2]) if name == "GlobalAvgPool" else out


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the torch reference's own warning
@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_torch_nn(backend, name):
    layer, ref, x = pair(name)
    out = layer(x)
    assert lm.backend_of(out).name == backend
    np.testing.assert_allclose(to_np(out), torch_out(name, ref, x).detach().numpy(), rtol=1e-5, atol=1e-5)


class WithInput(lm.Module):
    """layer(x) with x held as a parameter, so value_and_grad also gives the gradient for the input."""

    def __init__(self, layer, x):
        super().__init__()
        self.layer = layer
        self.x = lm.Parameter(value=x)

    def forward(self, weights):
        return (self.layer(self.x) * weights).sum()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", [n for n in CASES if n != "Embedding"])
def test_gradients_match_torch_nn(grad_backend, name):
    layer, ref, x = pair(name)
    r = np.random.default_rng(2).standard_normal(tuple(torch_out(name, ref, x).shape)).astype(np.float32)
    _, grads = lm.value_and_grad(lambda m, w: m(w))(WithInput(layer, x), r)
    t = torch.from_numpy(x).requires_grad_()
    out = ref(t)
    out = out.reshape(out.shape[:2]) if name == "GlobalAvgPool" else out
    (out * torch.from_numpy(r)).sum().backward()
    np.testing.assert_allclose(to_np(grads["x"]), t.grad.numpy(), rtol=1e-4, atol=1e-5)
    for k, _ in layer.named_parameters():
        np.testing.assert_allclose(to_np(grads[f"layer.{k}"]), getattr(ref, k).grad.numpy(), rtol=1e-4, atol=1e-4)


def test_embedding_gradient_matches_torch_nn(grad_backend):
    layer, ref, x = pair("Embedding")
    r = np.random.default_rng(2).standard_normal((3, 5, 4)).astype(np.float32)
    b = lm.get_backend()
    _, grads = lm.value_and_grad(lambda m, idx: (m(idx) * b.from_numpy(r)).sum())(layer, x)
    (ref(torch.from_numpy(x)) * torch.from_numpy(r)).sum().backward()
    np.testing.assert_allclose(to_np(grads["weight"]), ref.weight.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_check_layer_passes(backend, name):
    make, _, shape = CASES[name]
    lm.testing.check_layer(make(), shape, input_fn=lambda s, rng: inputs(name, s))


def test_layers_save_and_load_through_checkpoints(backend, tmp_path):
    net = lm.Sequential(lm.Conv2d(4, 3, padding=1), lm.ReLU(), lm.MaxPool2d(2), lm.Flatten(), lm.LayerNorm(),
                        lm.Linear(5))
    x = inputs("x", (2, 3, 6, 6))
    y = to_np(net(x))
    lm.save(net, tmp_path / "cnn.safetensors")
    clone = lm.Sequential(lm.Conv2d(4, 3, padding=1), lm.ReLU(), lm.MaxPool2d(2), lm.Flatten(), lm.LayerNorm(),
                          lm.Linear(5))
    lm.load_into(clone, tmp_path / "cnn.safetensors")  # never called: shapes come from the file
    assert clone[0].in_channels == 3
    np.testing.assert_array_equal(to_np(clone(x)), y)


def test_a_users_layer_with_library_layers_passes_check_layer(backend):
    class ConvBlock(lm.Module):
        def __init__(self):
            super().__init__()
            self.conv = lm.Conv1d(4, 3, padding="same")
            self.norm = lm.LayerNorm()
            self.pool = lm.AvgPool1d(2)

        def forward(self, x):
            return self.pool(self.norm(lm.ops.gelu(self.conv(x))))

    lm.testing.check_layer(ConvBlock(), (2, 3, 8), output_shape=(2, 4, 4))


def test_bad_arguments_and_inputs(backend):
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        lm.Conv2d(4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="groups=2 must be a positive int dividing out_channels=3"):
        lm.Conv1d(3, 3, groups=2)
    with pytest.raises(ValueError, match="must be at most half the kernel size"):
        lm.MaxPool2d(2, padding=2)
    conv = lm.Conv2d(4, 3)
    conv(inputs("x", (1, 3, 5, 5)))
    with pytest.raises(lm.ShapeError, match=r"\(Conv2d\) expected input \(N, 3, \.\.\.\)"):
        conv(inputs("x", (1, 2, 5, 5)))


def test_attention_over_an_empty_sequence_gives_an_empty_output(backend):
    """Found by the fuzz test: NumPy's max over an empty axis has no identity, so softmax over no keys raised."""
    lm.manual_seed(0)
    m = lm.MultiHeadAttention(8, 2)
    m(np.zeros((1, 3, 8), np.float32))
    out = m(np.zeros((0, 0, 8), np.float32))
    out = out[0] if isinstance(out, tuple) else out
    assert tuple(out.shape) == (0, 0, 8)
