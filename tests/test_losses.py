"""Losses and metrics against torch.nn.functional, including extreme logits."""

import numpy as np
import pytest

import lamina as lm

from conftest import to_np

torch = pytest.importorskip("torch", reason="the references are torch.nn.functional")
F = torch.nn.functional


def cases():
    rng = np.random.default_rng(0)
    for scale in (1.0, 30.0, 1e4):
        x = (rng.standard_normal((16, 7)) * scale).astype(np.float32)
        x[0] = [1e4, -1e4, 0, 0, 0, 0, 0]
        y = rng.integers(0, 7, 16)
        yield x, y


def on(backend, a):
    return lm.get_backend(backend).from_numpy(np.asarray(a))


def test_cross_entropy_with_integer_and_one_hot_labels(backend):
    for x, y in cases():
        ref = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(y)).item()
        assert np.isfinite(ref)
        got = float(to_np(lm.losses.cross_entropy(on(backend, x), on(backend, y))))
        np.testing.assert_allclose(got, ref, rtol=1e-5)
        onehot = np.eye(7, dtype=np.float32)[y]
        np.testing.assert_allclose(float(to_np(lm.losses.cross_entropy(on(backend, x), on(backend, onehot)))),
                                   ref, rtol=1e-5)
        soft = np.random.default_rng(1).dirichlet(np.ones(7), 16).astype(np.float32)
        ref_soft = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(soft)).item()
        np.testing.assert_allclose(float(to_np(lm.losses.cross_entropy(on(backend, x), on(backend, soft)))),
                                   ref_soft, rtol=1e-5)


def test_binary_cross_entropy_with_logits_and_mse(backend):
    for x, _ in cases():
        t = np.random.default_rng(2).random(x.shape).astype(np.float32)
        ref = F.binary_cross_entropy_with_logits(torch.from_numpy(x), torch.from_numpy(t)).item()
        got = float(to_np(lm.losses.binary_cross_entropy_with_logits(on(backend, x), on(backend, t))))
        np.testing.assert_allclose(got, ref, rtol=1e-5)
        ref = F.mse_loss(torch.from_numpy(x), torch.from_numpy(t)).item()
        np.testing.assert_allclose(float(to_np(lm.losses.mse(on(backend, x), on(backend, t)))), ref, rtol=1e-5)


def test_accuracy(backend):
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], np.float32)
    labels = np.array([1, 0, 0, 0])
    assert float(to_np(lm.losses.accuracy(on(backend, scores), on(backend, labels)))) == 0.75
    onehot = np.eye(2, dtype=np.float32)[labels]
    assert float(to_np(lm.losses.accuracy(on(backend, scores), on(backend, onehot)))) == 0.75


def test_cross_entropy_gradient_matches_torch(grad_backend):
    x, y = next(cases())

    class Logits(lm.Module):
        def __init__(self):
            super().__init__()
            self.z = lm.Parameter(value=x)

        def forward(self, labels):
            return lm.losses.cross_entropy(self.z, labels)

    _, grads = lm.value_and_grad(lambda m, labels: m(labels))(Logits(), on(grad_backend, y))
    t = torch.from_numpy(x).requires_grad_()
    F.cross_entropy(t, torch.from_numpy(y)).backward()
    np.testing.assert_allclose(to_np(grads["z"]), t.grad.numpy(), rtol=1e-5, atol=1e-7)
