"""Training-step throughput: lamina against plain torch.nn + torch.optim and hand-written jax.jit + optax.

Models: an MLP 784-512-512-10 with ReLU, batch 128, softmax cross-entropy, Adam; and the textbook-sized
MyLinear(64, 8) -> MyLinear(8, 1), batch 32, mean squared error, Adam, where per-call overhead dominates.
Each candidate runs the same number of steps per round, interleaved over rounds; the figure is the median
time per step. "lamina step" is the backend's train step as ``lm.fit`` uses it; "lamina fit" is a whole
``lm.fit`` epoch over the same batches (batching, loss read-back and bookkeeping included).
Target: at least 0.95x the steps per second of the plain-torch and hand-written-jax references.

Run: python bench/train_step.py [--backends torch jax] [--rounds 7] [--steps 30]
For stable figures pin one core: taskset -c 1 env OMP_NUM_THREADS=1 python bench/train_step.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import lamina as lm  # noqa: E402


class MyLinear(lm.Module):
    def __init__(self, in_units, units):
        super().__init__()
        self.weight = lm.Parameter((in_units, units), init=lm.init.normal(0, in_units**-0.5))
        self.bias = lm.Parameter((units,), init=lm.init.zeros())

    def forward(self, X):
        return lm.ops.relu(X @ self.weight + self.bias)


def models():
    return {
        "mlp 784-512-512-10, batch 128": (lambda: lm.Sequential(lm.Linear(784, 512), lm.ReLU(), lm.Linear(512, 512),
                                                                lm.ReLU(), lm.Linear(512, 10)),
                                          (128, 784), "ce"),
        "MyLinear(64,8)->MyLinear(8,1), batch 32": (lambda: lm.Sequential(MyLinear(64, 8), MyLinear(8, 1)),
                                                    (32, 64), "mse"),
    }


def make_batches(shape, kind, n, seed=0):
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((n, *shape)).astype(np.float32)
    ys = rng.integers(0, 10, (n, shape[0])) if kind == "ce" else rng.standard_normal((n, shape[0], 1)).astype(
        np.float32)
    return xs, ys


def torch_reference(model, kind):
    """The same model and weights as plain torch.nn modules."""
    import torch
    from torch import nn

    class Lin(nn.Module):  # (in, out) weights like lamina's, x @ W + b
        def __init__(self, w, b, relu):
            super().__init__()
            self.weight, self.bias, self.relu = nn.Parameter(torch.from_numpy(w.copy())), nn.Parameter(
                torch.from_numpy(b.copy())), relu

        def forward(self, x):
            y = torch.addmm(self.bias, x, self.weight)
            return torch.relu(y) if self.relu else y

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    layers = []
    idx = sorted({int(k.split(".")[0]) for k in state})
    for i in idx:
        relu = kind == "mse" or (i + 1) in {int(k.split(".")[0]) + 1 for k in state} and i != idx[-1]
        layers.append(Lin(state[f"{i}.weight"], state[f"{i}.bias"], relu))
    return nn.Sequential(*layers)


def bench_torch(name, make, shape, kind, steps, rounds):
    import torch

    lm.set_backend("torch")
    lm.manual_seed(0)
    loss_fn = lm.losses.cross_entropy if kind == "ce" else lm.losses.mse
    model = make()
    opt = lm.optim.Adam(model, lr=1e-3)
    xs, ys = make_batches(shape, kind, steps)
    txs, tys = list(torch.from_numpy(xs)), list(torch.from_numpy(ys))
    step = model._backend.train_step(model, loss_fn, opt, False, outputs=False)

    ref_default = torch_reference(model, kind)
    ref_foreach = torch_reference(model, kind)
    tl = torch.nn.functional.cross_entropy if kind == "ce" else torch.nn.functional.mse_loss
    opt_default = torch.optim.Adam(ref_default.parameters(), lr=1e-3)  # what most users write
    opt_foreach = torch.optim.Adam(ref_foreach.parameters(), lr=1e-3, foreach=True)

    def run_ref(net, o):
        for i in range(steps):
            o.zero_grad(set_to_none=True)
            tl(net(txs[i]), tys[i]).backward()
            o.step()

    def run_step():
        for i in range(steps):
            step(txs[i], tys[i], 1e-3)

    batches = list(zip(txs, tys))

    def run_fit():
        lm.fit(model, loss_fn, opt, batches, epochs=1, progress=False)

    cands = {"lamina step": run_step, "lamina fit": run_fit, "torch.nn + Adam()": lambda: run_ref(ref_default,
             opt_default), "torch.nn + Adam(foreach)": lambda: run_ref(ref_foreach, opt_foreach)}
    return measure(f"[torch] {name}", cands, steps, rounds,
                   refs=["torch.nn + Adam()", "torch.nn + Adam(foreach)"])


def bench_jax(name, make, shape, kind, steps, rounds):
    import jax
    import jax.numpy as jnp
    import optax

    lm.set_backend("jax")
    lm.manual_seed(0)
    loss_fn = lm.losses.cross_entropy if kind == "ce" else lm.losses.mse
    model = make()
    opt = lm.optim.Adam(model, lr=1e-3)
    xs, ys = make_batches(shape, kind, steps)
    jxs, jys = [jnp.asarray(a) for a in xs], [jnp.asarray(a) for a in ys]  # pre-sliced: no slicing op in a step
    step = model._backend.train_step(model, loss_fn, opt, None, outputs=False)

    params = {k: jnp.array(v) for k, v in model.state_dict().items()}
    names = sorted({k.split(".")[0] for k in params}, key=int)
    tx = optax.adam(1e-3)

    def forward(p, x):
        for j, i in enumerate(names):
            x = x @ p[f"{i}.weight"] + p[f"{i}.bias"]
            if kind == "mse" or j < len(names) - 1:
                x = jnp.maximum(x, 0)
        return x

    def ref_loss(p, x, y):
        out = forward(p, x)
        if kind == "ce":
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        return ((out - y) ** 2).mean()

    @jax.jit
    def ref_step(p, s, x, y):
        loss, g = jax.value_and_grad(ref_loss)(p, x, y)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    ref_step = jax.jit(ref_step.__wrapped__, donate_argnums=(0, 1))
    ref_state = {"p": params, "s": tx.init(params)}

    def run_ref():
        p, s = ref_state["p"], ref_state["s"]
        for i in range(steps):
            p, s, loss = ref_step(p, s, jxs[i], jys[i])
        loss.block_until_ready()
        ref_state["p"], ref_state["s"] = p, s

    def run_step():
        for i in range(steps):
            loss, _ = step(jxs[i], jys[i], 1e-3)
        loss.block_until_ready()

    batches = [(jxs[i], jys[i]) for i in range(steps)]

    def run_fit():
        lm.fit(model, loss_fn, opt, batches, epochs=1, progress=False)

    cands = {"lamina step": run_step, "lamina fit": run_fit, "jax.jit + optax": run_ref}
    return measure(f"[jax] {name}", cands, steps, rounds, refs=["jax.jit + optax"])


def measure(title, cands, steps, rounds, refs):
    for fn in cands.values():
        fn()  # compile and warm up
    samples = {k: [] for k in cands}
    for _ in range(rounds):
        for k, fn in cands.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"\n{title}")
    for k, t in med.items():
        print(f"  {k:<26} {t * 1e3:8.3f} ms/step  {1 / t:8.1f} steps/s")
    ratios = {}
    for ours in ("lamina step", "lamina fit"):
        for ref in refs:
            ratios[(ours, ref)] = med[ref] / med[ours]
            print(f"  {ours} / {ref}: {ratios[(ours, ref)]:.3f}x the steps per second")
    return ratios


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="*", default=[b for b in lm.available_backends() if b != "numpy"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    summary = []
    for name, (make, shape, kind) in models().items():
        for backend in args.backends:
            fn = bench_torch if backend == "torch" else bench_jax
            for (ours, ref), r in fn(name, make, shape, kind, args.steps, args.rounds).items():
                summary.append((backend, name, ours, ref, r))
    print("\nSummary (steps per second, lamina / reference; target >= 0.95)")
    for backend, name, ours, ref, r in summary:
        print(f"  {backend:<5} {name:<42} {ours:<12} vs {ref:<26} {r:.3f}")


if __name__ == "__main__":
    main()
