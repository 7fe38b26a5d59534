"""The textbook's "Custom Layers" section, cell by cell, on one backend, plus both exercises.

Run: python examples/custom_layers.py --backend {torch,jax,numpy}   (default: the first installed)
"""

from __future__ import annotations

import argparse

import numpy as np

import lamina as lm


def cell(title: str) -> None:
    print(f"\n--- {title} ---")


# Layers without parameters: subclass lm.Module and write forward.
class CenteredLayer(lm.Module):
    def forward(self, X):
        return X - X.mean()


# Layers with parameters: lm.Parameter gives access, initialization, sharing, saving and loading.
class MyLinear(lm.Module):
    def __init__(self, in_units, units):
        super().__init__()
        self.weight = lm.Parameter((in_units, units), init=lm.init.normal())
        self.bias = lm.Parameter((units,), init=lm.init.normal())

    def forward(self, X):
        # self.weight is the backend's own array, so gradients reach it (the textbook's PyTorch tab
        # reads self.weight.data here, which cuts the weight off from autograd).
        return lm.ops.relu(X @ self.weight + self.bias)


# The lazily sized version (the textbook's Keras MyDense): shapes come from the first input.
class MyDense(lm.Module):
    def __init__(self, units):
        super().__init__()
        self.units = units

    def build(self, input_shape):
        self.weight = lm.Parameter((input_shape[-1], self.units), init=lm.init.normal())
        self.bias = lm.Parameter((self.units,), init=lm.init.zeros())

    def forward(self, X):
        return lm.ops.relu(X @ self.weight + self.bias)


def main(backend: str) -> None:
    lm.set_backend(backend)
    lm.manual_seed(0)
    rng = np.random.default_rng(0)
    print(f"lamina {lm.__version__} on the {backend} backend")

    cell("CenteredLayer()([1, 2, 3, 4, 5])")
    layer = CenteredLayer()
    print(layer(np.array([1.0, 2, 3, 4, 5], dtype=np.float32)))

    cell("net = Sequential(Linear(128), CenteredLayer()); net(rand(4, 8)).mean()")
    net = lm.Sequential(lm.Linear(128), CenteredLayer())
    Y = net(rng.random((4, 8), dtype=np.float32))
    mean = float(lm.get_backend().to_numpy(Y).mean())
    print(f"{type(Y).__module__}.{type(Y).__name__}", tuple(Y.shape), "mean:", mean)
    print(net)

    cell("linear = MyLinear(5, 3); linear.weight")
    linear = MyLinear(5, 3)
    print(linear.weight)

    cell("linear(rand(2, 5))")
    print(linear(rng.random((2, 5), dtype=np.float32)))

    cell("MyDense(3): lazily sized, built on the first call")
    dense = MyDense(3)
    print(dense(rng.random((2, 5), dtype=np.float32)))
    print([(name, p.shape) for name, p in dense.named_parameters()])

    cell("net = Sequential(MyLinear(64, 8), MyLinear(8, 1)); net(rand(2, 64))")
    net = lm.Sequential(MyLinear(64, 8), MyLinear(8, 1))
    print(net(rng.random((2, 64), dtype=np.float32)))
    for name, p in net.named_parameters():
        print(f"  {name:<10} {p.shape}")

    cell("Exercise 1: TensorReduction(2): y_k = sum_ij W_ijk x_i x_j")
    tr = lm.TensorReduction(2)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    y = lm.get_backend().to_numpy(tr(x))
    W = lm.get_backend().to_numpy(tr.weight)
    loop = np.array([[sum(W[i, j, k] * xb[i] * xb[j] for i in range(4) for j in range(4)) for k in range(2)]
                     for xb in x])
    print(y)
    print("matches the explicit loop:", np.allclose(y, loop, rtol=1e-4, atol=1e-5))

    cell("Exercise 2: LeadingFourier(): the first (n + 1) // 2 DFT coefficients along the last axis")
    signal = np.cos(2 * np.pi * np.arange(8) / 8).astype(np.float32)[None]
    coeffs = lm.get_backend().to_numpy(lm.LeadingFourier()(signal))
    print(np.round(coeffs, 4))
    print("matches numpy.fft.fft(x)[..., :4]:", np.allclose(coeffs, np.fft.fft(signal)[..., :4], atol=1e-5))

    cell("Gradients reach MyLinear's parameters")
    if not lm.get_backend().has_autodiff:
        print(f"the {backend} backend has no autodiff; train on torch or jax and load the weights here")
    else:
        loss, grads = lm.value_and_grad(lambda m, x: (m(x) ** 2).sum())(net, rng.random((2, 64), dtype=np.float32))
        print("loss:", float(lm.get_backend().to_numpy(loss)))
        for name, g in grads.items():
            print(f"  d loss / d {name:<10} norm {float(np.linalg.norm(lm.get_backend().to_numpy(g))):.4f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=lm.available_backends(), default=lm.available_backends()[0])
    main(ap.parse_args().backend)
