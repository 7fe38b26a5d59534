"""Training throughput on jax: Lamina against Keras 3, Flax NNX and Equinox, each written as its documentation
teaches, on issue 13's three workloads (see bench/train_step.py), with the best hand-written loop (``jax.jit`` +
optax, donated buffers) as the reference measured in the same run.

Candidates:
  lamina fit          ``lm.fit`` with its defaults over (X, Y) NumPy arrays (shuffles each epoch)
  lamina fit k=1      ``lm.fit(steps_per_call=1)``
  keras fit           Keras 3 on jax: ``model.compile(optimizer=Adam)``, ``model.fit(X, Y)`` with its defaults
                      (shuffles each epoch, one step per call, ``jit_compile`` on)
  flax nnx            ``nnx.Optimizer`` and an ``@nnx.jit`` train step over pre-made batches (Flax's tutorial)
  equinox             ``@eqx.filter_jit`` step with ``eqx.filter_value_and_grad`` and optax over pre-made batches
  jax jit+optax       the reference: ``jax.jit`` step, optax.adam, donated buffers, pre-made batches

A framework that is not installed is left out, with a line that says so (``pip install flax equinox``; Keras
comes with tensorflow here). Each workload runs in a fresh process; rounds are interleaved, each starting one
candidate later; figures are medians of the time per step, and the ratios (steps per second over the
reference's) come from the same run.

Run: python bench/frameworks.py [--workloads mlp tiny cnn] [--rounds 3] [--steps 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")  # before anything imports keras
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as ts  # noqa: E402

REFERENCE = "jax jit+optax"


def keras_candidate(name, steps):
    import keras

    w = ts.WORKLOADS[name]
    x, y = ts.data(name, steps)
    keras.utils.set_random_seed(0)
    L = keras.layers
    if name == "mlp":
        layers = [L.Dense(512, activation="relu"), L.Dense(512, activation="relu"), L.Dense(10)]
    elif name == "tiny":
        layers = [L.Dense(8, activation="relu"), L.Dense(1)]
    else:  # Keras' default layout is channels-last: the images are given to it so, once
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        layers = [L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(2), L.Conv2D(64, 3, activation="relu"),
                  L.MaxPooling2D(2), L.Flatten(), L.Dense(10)]
    model = keras.Sequential([keras.Input(x.shape[1:])] + layers)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True) if w["loss"] == "ce" else "mse"
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    return lambda: model.fit(x, y, batch_size=w["batch"], epochs=1, verbose=0)


def flax_candidate(name, steps):
    import jax
    import optax
    from flax import nnx

    w = ts.WORKLOADS[name]
    x, y = ts.data(name, steps)
    if name == "cnn":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # NHWC, Flax's layout
    rngs = nnx.Rngs(0)

    class Net(nnx.Module):
        def __init__(self):
            if name == "mlp":
                self.layers = nnx.List([nnx.Linear(784, 512, rngs=rngs), nnx.Linear(512, 512, rngs=rngs),
                                        nnx.Linear(512, 10, rngs=rngs)])
            elif name == "tiny":
                self.layers = nnx.List([nnx.Linear(64, 8, rngs=rngs), nnx.Linear(8, 1, rngs=rngs)])
            else:
                self.conv1 = nnx.Conv(1, 32, (3, 3), padding="VALID", rngs=rngs)
                self.conv2 = nnx.Conv(32, 64, (3, 3), padding="VALID", rngs=rngs)
                self.head = nnx.Linear(1600, 10, rngs=rngs)

        def __call__(self, h):
            if name == "cnn":
                h = nnx.max_pool(nnx.relu(self.conv1(h)), (2, 2), (2, 2))
                h = nnx.max_pool(nnx.relu(self.conv2(h)), (2, 2), (2, 2))
                return self.head(h.reshape(h.shape[0], -1))
            for layer in self.layers[:-1]:
                h = nnx.relu(layer(h))
            return self.layers[-1](h)

    def loss_fn(model, xb, yb):
        out = model(xb)
        if w["loss"] == "ce":
            return optax.softmax_cross_entropy_with_integer_labels(out, yb).mean()
        return ((out - yb) ** 2).mean()

    model = Net()
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, xb, yb):
        loss, grads = nnx.value_and_grad(loss_fn)(model, xb, yb)
        optimizer.update(model, grads)
        return loss

    b = w["batch"]
    batches = [(jax.numpy.asarray(x[i:i + b]), jax.numpy.asarray(y[i:i + b])) for i in range(0, len(y), b)]

    def run():
        for xb, yb in batches:
            loss = train_step(model, optimizer, xb, yb)
        loss.block_until_ready()

    return run


def equinox_candidate(name, steps):
    import equinox as eqx
    import jax
    import optax

    w = ts.WORKLOADS[name]
    x, y = ts.data(name, steps)
    keys = iter(jax.random.split(jax.random.key(0), 8))
    if name == "mlp":
        model = eqx.nn.MLP(784, 10, 512, 2, activation=jax.nn.relu, key=next(keys))
    elif name == "tiny":
        model = eqx.nn.MLP(64, 1, 8, 1, activation=jax.nn.relu, key=next(keys))
    else:
        model = eqx.nn.Sequential([eqx.nn.Conv2d(1, 32, 3, key=next(keys)), eqx.nn.Lambda(jax.nn.relu),
                                   eqx.nn.MaxPool2d(2, 2), eqx.nn.Conv2d(32, 64, 3, key=next(keys)),
                                   eqx.nn.Lambda(jax.nn.relu), eqx.nn.MaxPool2d(2, 2), eqx.nn.Lambda(jax.numpy.ravel),
                                   eqx.nn.Linear(1600, 10, key=next(keys))])

    def loss_fn(model, xb, yb):
        out = jax.vmap(model)(xb)  # Equinox models take one example
        if w["loss"] == "ce":
            return optax.softmax_cross_entropy_with_integer_labels(out, yb).mean()
        return ((out - yb) ** 2).mean()

    tx = optax.adam(1e-3)
    box = {"model": model, "state": tx.init(eqx.filter(model, eqx.is_array))}

    @eqx.filter_jit
    def step(model, state, xb, yb):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, xb, yb)
        updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, loss

    b = w["batch"]
    batches = [(jax.numpy.asarray(x[i:i + b]), jax.numpy.asarray(y[i:i + b])) for i in range(0, len(y), b)]

    def run():
        model, state = box["model"], box["state"]
        for xb, yb in batches:
            model, state, loss = step(model, state, xb, yb)
        loss.block_until_ready()
        box["model"], box["state"] = model, state

    return run


FRAMEWORKS = {"keras fit": ("keras", keras_candidate), "flax nnx": ("flax", flax_candidate),
              "equinox": ("equinox", equinox_candidate)}


def run(name, rounds, steps_factor) -> list:
    steps = steps_factor * ts.WORKLOADS[name]["steps"]
    lamina = ts.lamina_candidates("jax", name, steps)
    cands = {k: lamina[k] for k in ("lamina fit", "lamina fit k=1")}
    for label, (module, make) in FRAMEWORKS.items():
        if importlib.util.find_spec(module) is None:
            print(f"  ({label}: {module} is not installed, left out)")
            continue
        cands[label] = make(name, steps)
    cands[REFERENCE] = ts.jax_candidates(name, steps)[REFERENCE]
    times = ts.measure(cands, steps, rounds)
    print(f"\n[jax] {name}   (reference: {REFERENCE})")
    rows = []
    for k, t in times.items():
        print(f"  {k:<16} {t * 1e3:9.3f} ms/step {1 / t:9.1f} steps/s   {times[REFERENCE] / t:.2f}x the reference")
        rows.append((name, k, times[REFERENCE] / t))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="*", default=list(ts.WORKLOADS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # one workload, in this process
    args = ap.parse_args()
    if importlib.util.find_spec("optax") is None:
        sys.exit("bench/frameworks.py needs optax for its reference (pip install optax)")
    if args.inner:
        rows = run(args.workloads[0], args.rounds, args.steps)
        print("ROWS " + json.dumps(rows))
        return
    rows = []
    for name in args.workloads:  # each workload in a fresh process
        cmd = [sys.executable, __file__, "--inner", "--workloads", name, "--rounds", str(args.rounds),
               "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("ROWS "):
                rows += json.loads(line[5:])
            else:
                print(line)
    print(f"\nSummary: steps per second / {REFERENCE}'s (higher is better)")
    names = list(dict.fromkeys(k for _, k, _ in rows))
    print("  " + f"{'workload':<9}" + "".join(f"{k:>16}" for k in names))
    for name in args.workloads:
        got = {k: r for n, k, r in rows if n == name}
        print("  " + f"{name:<9}" + "".join(f"{got[k]:>16.2f}" if k in got else f"{'-':>16}" for k in names))


if __name__ == "__main__":
    main()
