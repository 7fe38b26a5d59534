"""Training throughput on the tensorflow backend: lamina's ``fit`` against a hand-written ``tf.function`` step
with a Keras optimizer and against ``keras.Model.fit``.

Workloads (the ones of bench/train_step.py, same data):
  mlp   784-512-512-10 with ReLU, batch 128, softmax cross-entropy, Adam
  tiny  Linear(64, 8) + ReLU -> Linear(8, 1), batch 32, mean squared error, Adam

Candidates:
  lamina fit            ``lm.fit`` with its defaults (XLA, the epoch's rows on the device, 16 steps per call in a
                        ``tf.while_loop`` where the step measured faster so), shuffling and batching in
  lamina fit k=1        ``fit(steps_per_call=1)``: one compiled call per step
  lamina step           the compiled step alone, one call per step, over the pre-made batches the hand-written
                        loop uses
  tf.function+keras     a hand-written step: ``tf.GradientTape`` over ``tf.Variable`` weights and
                        ``keras.optimizers.Adam.apply_gradients``, in one ``tf.function`` (graph mode)
  tf.function+keras xla the same with ``jit_compile=True``
  keras Model.fit       ``keras.Sequential`` of ``Dense`` layers, ``compile(Adam, loss)`` and ``fit`` (its
                        defaults: ``jit_compile="auto"``, which is XLA on TensorFlow)

Every candidate runs ``--steps`` steps per round (the fits: one epoch over the same arrays, shuffled, batched);
rounds are interleaved, so machine noise hits all alike; the figure is the median time per step. The ratio is
steps per second of lamina over the best hand-written ``tf.function`` step (target >= 1.0).
Noisy on a shared machine; for stable figures pin a core: taskset -c 1 python bench/tf_train_step.py

Run: python bench/tf_train_step.py [--workloads mlp tiny] [--rounds 5] [--steps 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from train_step import WORKLOADS, data, lamina_model  # noqa: E402

import lamina as lm  # noqa: E402


def lamina_candidates(name, steps):
    lm.set_backend("tensorflow")
    lm.manual_seed(0)
    x, y = data(name, steps)
    loss = lm.losses.cross_entropy if WORKLOADS[name]["loss"] == "ce" else lm.losses.mse
    batch = WORKLOADS[name]["batch"]

    def fit_with(**kw):
        model = lamina_model(name)
        opt = lm.optim.Adam(model, lr=1e-3)
        return lambda: lm.fit(model, loss, opt, (x, y), batch_size=batch, progress=False, **kw)

    from lamina.training import trainer_for

    def step_with(compile):  # the compiled step alone, over pre-made batches (as the hand-written loop runs)
        import tensorflow as tf

        model = lamina_model(name)
        opt = lm.optim.Adam(model, lr=1e-3)
        bx = [tf.constant(x[i * batch:(i + 1) * batch]) for i in range(steps)]
        by = [tf.constant(y[i * batch:(i + 1) * batch]) for i in range(steps)]
        model(bx[0])
        step = trainer_for(lm.get_backend("tensorflow")).make_step(model, loss, opt, compile, outputs=False)

        def run():
            for xb, yb in zip(bx, by):
                value, _ = step(xb, yb, 1e-3)
            value.numpy()

        return run

    return {"lamina fit": fit_with(), "lamina fit k=1": fit_with(steps_per_call=1), "lamina step": step_with(None)}


def tf_candidates(name, steps):
    import keras
    import tensorflow as tf

    x, y = data(name, steps)
    batch = WORKLOADS[name]["batch"]
    ce = WORKLOADS[name]["loss"] == "ce"
    dims = (784, 512, 512, 10) if name == "mlp" else (64, 8, 1)
    bx = [tf.constant(x[i * batch:(i + 1) * batch]) for i in range(steps)]
    by = [tf.constant(y[i * batch:(i + 1) * batch]) for i in range(steps)]

    def hand_written(jit):
        rng = np.random.default_rng(0)
        ws = [tf.Variable(rng.standard_normal((i, o)).astype(np.float32) * i**-0.5) for i, o in zip(dims, dims[1:])]
        bs = [tf.Variable(np.zeros(o, np.float32)) for o in dims[1:]]
        variables = [v for pair in zip(ws, bs) for v in pair]
        opt = keras.optimizers.Adam(1e-3)
        opt.build(variables)

        @tf.function(jit_compile=jit)
        def step(xb, yb):
            with tf.GradientTape() as tape:
                h = xb
                for j, (w, b) in enumerate(zip(ws, bs)):
                    h = tf.matmul(h, w) + b
                    if j < len(ws) - 1:
                        h = tf.nn.relu(h)
                if ce:
                    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yb, h))
                else:
                    loss = tf.reduce_mean(tf.square(h - yb))
            opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss

        def run():
            for xb, yb in zip(bx, by):
                loss = step(xb, yb)
            loss.numpy()

        return run

    def keras_fit():
        keras.utils.set_random_seed(0)
        layers = [keras.Input(dims[:1])]
        layers += [keras.layers.Dense(o, activation="relu" if j < len(dims) - 2 else None)
                   for j, o in enumerate(dims[1:])]
        model = keras.Sequential(layers)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True) if ce else keras.losses.MeanSquaredError()
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        return lambda: model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=True)

    return {"tf.function+keras": hand_written(False), "tf.function+keras xla": hand_written(True),
            "keras Model.fit": keras_fit()}


def measure(cands, steps, rounds):
    for fn in cands.values():
        fn()  # trace, compile and warm up
        fn()
    samples = {k: [] for k in cands}
    for _ in range(rounds):
        for k, fn in cands.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in samples.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="*", default=["mlp", "tiny"], choices=["mlp", "tiny"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    rows = []
    for name in args.workloads:
        steps = args.steps * WORKLOADS[name]["steps"]
        ours = lamina_candidates(name, steps)
        refs = tf_candidates(name, steps)
        times = measure({**ours, **refs}, steps, args.rounds)
        best = min(("tf.function+keras", "tf.function+keras xla"), key=times.get)
        print(f"\n[tensorflow] {name}, {steps} steps a round   (best hand-written tf.function step: {best})")
        for k, t in times.items():
            line = f"  {k:<22} {t * 1e3:9.3f} ms/step {1 / t:9.1f} steps/s"
            if k in ours:
                r_hand, r_fit = times[best] / t, times["keras Model.fit"] / t
                line += f"   {r_hand:.2f}x the hand-written step, {r_fit:.2f}x keras fit"
                rows.append((name, k, r_hand, r_fit))
            print(line)
    print("\nSummary: steps per second, lamina / reference (target >= 1.0 against the hand-written step)")
    for name, k, r_hand, r_fit in rows:
        print(f"  {name:<5} {k:<16} hand-written tf.function: {r_hand:.2f}   keras Model.fit: {r_fit:.2f}")


if __name__ == "__main__":
    main()
