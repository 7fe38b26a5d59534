"""Per-call cost, eager, of small models: lamina against torch.nn and raw ops, in one interleaved run.

Models: CenteredLayer on a 5-vector; Linear(64, 8) on (2, 64); an 8-layer MLP (64 wide, ReLU) on (32, 64).
References: torch.nn.Module and raw torch ops (torch backend), raw jax.numpy (jax backend), raw numpy
(numpy backend), raw TensorFlow ops on tf.Variables and the same models as keras.layers.Layer subclasses
(tensorflow backend). Targets: torch backend no slower than torch.nn (ratio <= 1.0); jax, numpy and
tensorflow within 1.2x of the raw ops.

Run: python bench/overhead.py [--backends torch jax numpy] [--rounds 15]
For stable figures pin one core: taskset -c 1 env OMP_NUM_THREADS=1 python bench/overhead.py
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved, report  # noqa: E402

import lamina as lm  # noqa: E402


class CenteredLayer(lm.Module):
    def forward(self, X):
        return X - X.mean()


def lamina_models():
    mlp = [lm.Linear(64, 64) if i < 7 else lm.Linear(64, 8) for i in range(8)]
    layers = []
    for i, layer in enumerate(mlp):
        layers.append(layer)
        if i < 7:
            layers.append(lm.ReLU())
    return {"centered": CenteredLayer(), "linear": lm.Linear(64, 8), "mlp8": lm.Sequential(layers)}


INPUTS = {"centered": (5,), "linear": (2, 64), "mlp8": (32, 64)}


def weights_of(model):
    return [(model.get_parameter(f"{i}.weight").numpy(), model.get_parameter(f"{i}.bias").numpy())
            for i in range(0, 15, 2)]


def torch_refs(models, xs):
    import torch
    from torch import nn

    class TorchCentered(nn.Module):
        def forward(self, X):
            return X - X.mean()

    lin = nn.Linear(64, 8)
    seq = []
    for i in range(8):
        seq.append(nn.Linear(64, 64 if i < 7 else 8))
        if i < 7:
            seq.append(nn.ReLU())
    seq = nn.Sequential(*seq)
    with torch.no_grad():  # same weights as the lamina models (torch stores them (out, in))
        lin.weight.copy_(torch.from_numpy(models["linear"].get_parameter("weight").numpy().T))
        lin.bias.copy_(torch.from_numpy(models["linear"].get_parameter("bias").numpy()))
        for layer, (w, b) in zip([m for m in seq if isinstance(m, nn.Linear)], weights_of(models["mlp8"])):
            layer.weight.copy_(torch.from_numpy(w.T))
            layer.bias.copy_(torch.from_numpy(b))
    raw_w = [(torch.from_numpy(w).requires_grad_(), torch.from_numpy(b).requires_grad_())
             for w, b in weights_of(models["mlp8"])]
    lw = torch.from_numpy(models["linear"].get_parameter("weight").numpy()).requires_grad_()
    lb = torch.from_numpy(models["linear"].get_parameter("bias").numpy()).requires_grad_()

    def raw_mlp(x):
        for i, (w, b) in enumerate(raw_w):
            x = x @ w + b
            if i < 7:
                x = torch.relu(x)
        return x

    nn_models = {"centered": TorchCentered(), "linear": lin, "mlp8": seq}
    raw = {"centered": lambda x: x - x.mean(), "linear": lambda x: x @ lw + lb, "mlp8": raw_mlp}
    for k in xs:
        np.testing.assert_allclose(nn_models[k](xs[k]).detach().numpy(), models[k](xs[k]).detach().numpy(),
                                   rtol=1e-5, atol=1e-5)
    return {"torch.nn": nn_models, "raw torch": raw}


def raw_refs(models, xs, mod):
    """Raw array code in ``mod`` (jax.numpy or numpy) with the lamina models' weights."""
    to = (lambda a: mod.asarray(a))
    raw_w = [(to(w), to(b)) for w, b in weights_of(models["mlp8"])]
    lw, lb = to(models["linear"].get_parameter("weight").numpy()), to(models["linear"].get_parameter("bias").numpy())

    def raw_mlp(x):
        for i, (w, b) in enumerate(raw_w):
            x = x @ w + b
            if i < 7:
                x = mod.maximum(x, 0)
        return x

    return {"centered": lambda x: x - x.mean(), "linear": lambda x: x @ lw + lb, "mlp8": raw_mlp}


def tf_refs(models, xs):
    """Raw TensorFlow ops on tf.Variables, and each model as a keras.layers.Layer, with the lamina weights."""
    import keras
    import tensorflow as tf

    def var(a):
        return tf.Variable(a)

    raw_w = [(var(w), var(b)) for w, b in weights_of(models["mlp8"])]
    lw, lb = var(models["linear"].get_parameter("weight").numpy()), var(models["linear"].get_parameter("bias").numpy())

    def raw_mlp(x):
        for i, (w, b) in enumerate(raw_w):
            x = tf.matmul(x, w) + b
            if i < 7:
                x = tf.nn.relu(x)
        return x

    class KCentered(keras.layers.Layer):
        def call(self, X):
            return X - tf.reduce_mean(X)

    class KLinear(keras.layers.Layer):  # the textbook's MyDense, with given weights
        def __init__(self, w, b):
            super().__init__()
            self.w = self.add_weight(shape=w.shape, initializer=keras.initializers.Constant(w))
            self.b = self.add_weight(shape=b.shape, initializer=keras.initializers.Constant(b))

        def call(self, X):
            return tf.matmul(X, self.w) + self.b

    class KMLP(keras.layers.Layer):
        def __init__(self, weights):
            super().__init__()
            self.layers_ = [KLinear(w, b) for w, b in weights]

        def call(self, x):
            for i, layer in enumerate(self.layers_):
                x = layer(x)
                if i < 7:
                    x = tf.nn.relu(x)
            return x

    k = {"centered": KCentered(), "mlp8": KMLP(weights_of(models["mlp8"])),
         "linear": KLinear(models["linear"].get_parameter("weight").numpy(),
                           models["linear"].get_parameter("bias").numpy())}
    raw = {"centered": lambda x: x - tf.reduce_mean(x), "linear": lambda x: tf.matmul(x, lw) + lb, "mlp8": raw_mlp}
    for name in xs:
        for ref in (k, raw):
            np.testing.assert_allclose(ref[name](xs[name]).numpy(), models[name](xs[name]).numpy(),
                                       rtol=1e-5, atol=1e-5)
    return {"raw tf": raw, "keras.layers.Layer": k}


def run(backend: str, rounds: int) -> dict:
    lm.set_backend(backend)
    lm.manual_seed(0)
    b = lm.get_backend(backend)
    models = lamina_models()
    rng = np.random.default_rng(0)
    xs = {k: b.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in INPUTS.items()}
    for k in models:
        models[k](xs[k])  # build and draw
    if backend == "torch":
        refs = torch_refs(models, xs)
    elif backend == "jax":
        import jax.numpy as jnp

        refs = {"raw jax.numpy": raw_refs(models, xs, jnp)}
    elif backend == "tensorflow":
        refs = tf_refs(models, xs)
    else:
        refs = {"raw numpy": raw_refs(models, xs, np)}
    sync = (lambda y: y.block_until_ready()) if backend == "jax" else (lambda y: y)
    ratios = {}
    for k, number in (("centered", 2000), ("linear", 2000), ("mlp8", 300)):
        x = xs[k]
        cands = {f"lamina ({backend})": (lambda m=models[k], x=x: sync(m(x)))}
        for ref_name, fns in refs.items():
            cands[ref_name] = (lambda f=fns[k], x=x: sync(f(x)))
        if backend == "jax":
            number = max(number // 10, 100)
        times = interleaved(cands, number, rounds)
        ratios[k] = report(f"[{backend}] {k} on {INPUTS[k]}", times, f"lamina ({backend})")
    return ratios


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="*", default=lm.available_backends())
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    summary = {b: run(b, args.rounds) for b in args.backends}
    print("\nSummary (lamina time / reference time; target: torch.nn <= 1.0, raw jax/numpy/tf <= 1.2)")
    for b, by_model in summary.items():
        for model, ratios in by_model.items():
            print(f"  {b:<10} {model:<9} " + "  ".join(f"{ref}: {r:.3f}" for ref, r in ratios.items()))


if __name__ == "__main__":
    main()
