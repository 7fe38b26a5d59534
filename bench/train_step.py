"""Training throughput: lamina's ``fit`` and a user's own loop against the best hand-written loop per backend.

Workloads (issue 13):
  mlp   784-512-512-10 with ReLU, batch 128, softmax cross-entropy, Adam
  tiny  Linear(64, 8) + ReLU -> Linear(8, 1), batch 32, mean squared error, Adam
  cnn   Conv2d(32, 3) + ReLU, MaxPool 2, Conv2d(64, 3) + ReLU, MaxPool 2, Linear(10); 1x28x28, batch 64, CE, Adam

Candidates, per backend:
  lamina fit          ``lm.fit`` with its defaults over (X, Y) NumPy arrays (shuffling, batching, bookkeeping in)
  lamina fit k=1      jax only: ``fit(steps_per_call=1)``, one compiled call per step
  lamina loop         ``lm.value_and_grad`` + ``opt.step(grads)``, on every backend
  lamina backward     torch only: the torch way with Lamina's model and optimizer, ``opt.zero_grad()``,
                      ``loss.backward()``, ``opt.step()``
  torch Adam()        torch.nn + torch.optim.Adam(), what most users write
  torch Adam(fused)   torch.nn + torch.optim.Adam(fused=True): the best hand-written torch loop on CPU
  torch channels_last (cnn) the fused loop with the input in channels-last memory: oneDNN's fast layout
  torch.compile       (with --compile) the fused loop with a torch.compile'd forward + loss
  jax jit+optax       jax.jit step with donated buffers and optax.adam (when optax is installed)
  jax jit+adam        the same with a hand-written Adam (always)
  torch fused+shuffle / jax jit+shuffle
                      the fastest loop of its backend as a user writes it over (X, Y) arrays: a new permutation
                      each epoch, the rows gathered once (torch: ``X[perm]``; jax: on the host, each batch given
                      to the step), the work of fit's default; printed beside ``lamina fit``, never "the best"

Each workload and backend runs in a fresh process, as issue 13's measurements did. Each candidate runs
``--steps`` steps per round over pre-made batches (but fit and the shuffling loops); rounds are interleaved,
each starting one candidate later, so machine noise hits all alike; the figure is the median time per step,
and the ratios (steps per second of lamina over the best reference of its backend) are measured in the same
run. For the MLP the share of the matmul roofline is printed, against a float32 matmul peak measured in the
same process. The figures are noisy on a shared machine; for stable ones
pin a core: taskset -c 1 env OMP_NUM_THREADS=1 python bench/train_step.py

Run: python bench/train_step.py [--backends torch jax] [--workloads mlp tiny cnn] [--rounds 3] [--steps 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time

import numpy as np

import lamina as lm

WORKLOADS = {  # steps: per round, relative to --steps (enough for fit to group 16 steps per call on jax)
    "mlp": dict(batch=128, shape=(784,), classes=10, loss="ce", steps=1),
    "tiny": dict(batch=32, shape=(64,), classes=None, loss="mse", steps=10),
    "cnn": dict(batch=64, shape=(1, 28, 28), classes=10, loss="ce", steps=1),
}


def lamina_model(name):
    if name == "mlp":
        return lm.Sequential(lm.Linear(784, 512), lm.ReLU(), lm.Linear(512, 512), lm.ReLU(), lm.Linear(512, 10))
    if name == "tiny":
        return lm.Sequential(lm.Linear(64, 8), lm.ReLU(), lm.Linear(8, 1))
    return lm.Sequential(lm.Conv2d(32, 3), lm.ReLU(), lm.MaxPool2d(2), lm.Conv2d(64, 3), lm.ReLU(), lm.MaxPool2d(2),
                         lm.Flatten(), lm.Linear(10))


def data(name, steps, seed=0):
    w = WORKLOADS[name]
    rng = np.random.default_rng(seed)
    n = w["batch"] * steps
    x = rng.standard_normal((n, *w["shape"])).astype(np.float32)
    y = rng.integers(0, w["classes"], n) if w["loss"] == "ce" else rng.standard_normal((n, 1)).astype(np.float32)
    return x, y


def mlp_flops_per_step():
    b, dims = 128, (784, 512, 512, 10)
    return 6 * b * sum(i * o for i, o in zip(dims, dims[1:]))  # forward 2, backward 4 flops per multiply-add


def matmul_peak():
    """Float32 GFLOP/s of a 1024^3 matmul on this machine: the best of NumPy's BLAS, torch's and XLA's (jax),
    best of 6 runs each (XLA's reaches about twice the BLAS figure on this machine's CPU)."""
    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    mms = [lambda: a @ a]
    if importlib.util.find_spec("torch") is not None:
        import torch

        t = torch.from_numpy(a)
        mms.append(lambda: t @ t)
    if importlib.util.find_spec("jax") is not None:
        import jax

        j = jax.numpy.asarray(a)
        mm = jax.jit(lambda m: m @ m)
        mm(j).block_until_ready()
        mms.append(lambda: mm(j).block_until_ready())
    best = min(_time(mm) for mm in mms for _ in range(6))
    return 2 * 1024**3 / best / 1e9


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----- lamina ---------------------------------------------------------------------------------------
def lamina_candidates(backend, name, steps):
    lm.set_backend(backend)
    lm.manual_seed(0)
    x, y = data(name, steps)
    loss = lm.losses.cross_entropy if WORKLOADS[name]["loss"] == "ce" else lm.losses.mse
    b = lm.get_backend(backend)
    batch = WORKLOADS[name]["batch"]
    out = {}

    def fit_with(**kw):
        model = lamina_model(name)
        opt = lm.optim.Adam(model, lr=1e-3)
        return lambda: lm.fit(model, loss, opt, (x, y), batch_size=batch, progress=False, **kw)

    out["lamina fit"] = fit_with()
    if backend == "jax":
        out["lamina fit k=1"] = fit_with(steps_per_call=1)

    model = lamina_model(name)
    opt = lm.optim.Adam(model, lr=1e-3)
    bx = [b.from_numpy(x[i * batch:(i + 1) * batch]) for i in range(steps)]
    by = [b.from_numpy(y[i * batch:(i + 1) * batch]) for i in range(steps)]
    grad = lm.value_and_grad(lambda m, xb, yb: loss(m(xb), yb))

    def loop():
        for xb, yb in zip(bx, by):
            _, grads = grad(model, xb, yb)
            opt.step(grads)
        b.to_numpy(model.state_dict()[next(iter(model.state_dict()))])  # wait for the device

    out["lamina loop"] = loop
    if backend == "torch":
        model2 = lamina_model(name)
        opt2 = lm.optim.Adam(model2, lr=1e-3)

        def backward_loop():
            for xb, yb in zip(bx, by):
                opt2.zero_grad()
                loss(model2(xb), yb).backward()
                opt2.step()

        out["lamina backward"] = backward_loop
    return out


SHUFFLED = {"torch": "torch fused+shuffle", "jax": "jax jit+shuffle"}  # the loops that shuffle each epoch, as fit


# ----- hand-written torch ---------------------------------------------------------------------------
def torch_candidates(name, steps, compile_too):
    import torch
    from torch import nn

    torch.manual_seed(0)
    x, y = data(name, steps)
    batch = WORKLOADS[name]["batch"]
    bx = [torch.from_numpy(x[i * batch:(i + 1) * batch]) for i in range(steps)]
    by = [torch.from_numpy(y[i * batch:(i + 1) * batch]) for i in range(steps)]
    lossf = nn.functional.cross_entropy if WORKLOADS[name]["loss"] == "ce" else nn.functional.mse_loss

    def net():
        if name == "mlp":
            return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        if name == "tiny":
            return nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 1))
        return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1600, 10))

    def loop_of(fused, compiled=False, channels_last=False):
        m = net()
        o = torch.optim.Adam(m.parameters(), lr=1e-3, **({"fused": True} if fused else {}))
        xs = [xb.to(memory_format=torch.channels_last) for xb in bx] if channels_last else bx

        def fwd(xb, yb):
            return lossf(m(xb), yb)

        f = torch.compile(fwd) if compiled else fwd

        def run():
            for xb, yb in zip(xs, by):
                o.zero_grad(set_to_none=True)
                f(xb, yb).backward()
                o.step()

        return run

    def shuffled_loop():
        """The fused loop as a user writes it over (X, Y) tensors: a new permutation each epoch (round)."""
        m = net()
        o = torch.optim.Adam(m.parameters(), lr=1e-3, fused=True)
        xall, yall, g = torch.from_numpy(x), torch.from_numpy(y), torch.Generator().manual_seed(0)
        xall = xall.to(memory_format=torch.channels_last) if name == "cnn" else xall

        def run():
            perm = torch.randperm(len(yall), generator=g)
            xs, ys = xall[perm], yall[perm]
            for i in range(0, len(ys), batch):
                o.zero_grad(set_to_none=True)
                lossf(m(xs[i:i + batch]), ys[i:i + batch]).backward()
                o.step()

        return run

    out = {"torch Adam()": loop_of(False), "torch Adam(fused)": loop_of(True), SHUFFLED["torch"]: shuffled_loop()}
    if name == "cnn":  # what an expert writes for convolutions on a CPU (Lamina's torch backend does it itself)
        out["torch channels_last"] = loop_of(True, channels_last=True)
    if compile_too:
        out["torch.compile"] = loop_of(True, compiled=True)
    return out


# ----- hand-written jax -----------------------------------------------------------------------------
def jax_candidates(name, steps):
    import jax
    import jax.numpy as jnp

    x, y = data(name, steps)
    batch = WORKLOADS[name]["batch"]
    bx = [jnp.asarray(x[i * batch:(i + 1) * batch]) for i in range(steps)]
    by = [jnp.asarray(y[i * batch:(i + 1) * batch]) for i in range(steps)]
    rng = np.random.default_rng(0)

    def dense(i, o):
        return {"w": jnp.asarray(rng.standard_normal((i, o)).astype(np.float32) * i**-0.5), "b": jnp.zeros(o)}

    def conv(i, o):
        return {"w": jnp.asarray(rng.standard_normal((o, i, 3, 3)).astype(np.float32) * (9 * i) ** -0.5),
                "b": jnp.zeros((1, o, 1, 1))}

    if name == "mlp":
        params = [dense(784, 512), dense(512, 512), dense(512, 10)]
    elif name == "tiny":
        params = [dense(64, 8), dense(8, 1)]
    else:
        params = [conv(1, 32), conv(32, 64), dense(1600, 10)]

    def forward(p, h):
        if name == "cnn":
            for layer in p[:2]:
                h = jax.lax.conv_general_dilated(h, layer["w"], (1, 1), "VALID",
                                                 dimension_numbers=("NCHW", "OIHW", "NCHW")) + layer["b"]
                h = jax.lax.reduce_window(jnp.maximum(h, 0), -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2),
                                          "VALID")
            return h.reshape(h.shape[0], -1) @ p[2]["w"] + p[2]["b"]
        for j, layer in enumerate(p):
            h = h @ layer["w"] + layer["b"]
            if j < len(p) - 1:
                h = jnp.maximum(h, 0)
        return h

    def loss(p, xb, yb):
        out = forward(p, xb)
        if WORKLOADS[name]["loss"] == "ce":
            return -jnp.take_along_axis(jax.nn.log_softmax(out), yb[:, None], 1).mean()
        return ((out - yb) ** 2).mean()

    def adam_init(p):
        return (jax.tree_util.tree_map(jnp.zeros_like, p), jax.tree_util.tree_map(jnp.zeros_like, p),
                jnp.zeros((), jnp.int32))

    def adam_update(g, s, p, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
        m, v, t = s
        t = t + 1
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        c1, c2 = 1 - b1**t, 1 - b2**t
        p = jax.tree_util.tree_map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), p, m, v)
        return p, (m, v, t)

    def loop_of(init, update, shuffled=False):
        @jax.jit
        def step(p, s, xb, yb):
            value, g = jax.value_and_grad(loss)(p, xb, yb)
            p, s = update(g, s, p)
            return p, s, value

        step = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
        box = {"p": jax.tree_util.tree_map(jnp.array, params)}
        box["s"] = init(box["p"])

        def run():
            p, s = box["p"], box["s"]
            batches = zip(bx, by)
            if shuffled:  # as a user writes it over (X, Y) arrays: a new permutation each epoch (round), the
                perm = rng.permutation(len(y))  # rows gathered on the host, each batch given to the step as is
                xs, ys = x[perm], y[perm]
                batches = ((xs[i:i + batch], ys[i:i + batch]) for i in range(0, len(ys), batch))
            for xb, yb in batches:
                p, s, value = step(p, s, xb, yb)
            value.block_until_ready()
            box["p"], box["s"] = p, s

        return run

    out = {"jax jit+adam": loop_of(adam_init, adam_update)}
    if importlib.util.find_spec("optax") is not None:
        import optax

        tx = optax.adam(1e-3)

        def optax_update(g, s, p):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        out["jax jit+optax"] = loop_of(tx.init, optax_update)
    fastest = (tx.init, optax_update) if "jax jit+optax" in out else (adam_init, adam_update)
    out[SHUFFLED["jax"]] = loop_of(*fastest, shuffled=True)
    return out


# ----- measuring ------------------------------------------------------------------------------------
def measure(cands, steps, rounds):
    for fn in cands.values():
        fn()  # compile and warm up
    samples = {k: [] for k in cands}
    order = list(cands)
    for r in range(rounds):  # each round starts one candidate later: none always runs after the same one
        for k in order[r % len(order):] + order[:r % len(order)]:
            samples[k].append(_time(cands[k]) / steps)
    return {k: statistics.median(v) for k, v in samples.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="*", default=[b for b in lm.available_backends() if b in ("torch", "jax")],
                    help="torch and/or jax (the backends with a hand-written reference here)")
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    ap.add_argument("--noise", action="store_true", help="also time a second copy of the issue's reference loop: its "
                    "ratio to the first is this run's noise floor")
    ap.add_argument("--peak", type=float, default=None, help=argparse.SUPPRESS)  # set for the inner processes
    args = ap.parse_args()
    peak = args.peak or matmul_peak()
    pairs = [(name, backend) for name in args.workloads for backend in args.backends]
    if args.peak is None:
        print(f"float32 matmul peak (1024^3, best of NumPy, torch and XLA): {peak:.0f} GFLOP/s")
    if len(pairs) > 1:  # each workload and backend in a fresh process: no thread pool or allocator state
        rows = []       # left over from another framework's candidates
        for name, backend in pairs:
            cmd = [sys.executable, __file__, "--backends", backend, "--workloads", name, "--rounds", str(args.rounds),
                   "--steps", str(args.steps), "--peak", str(peak)] + (["--compile"] if args.compile else []) + (
                   ["--noise"] if args.noise else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            for line in out.splitlines():
                if line.startswith("ROWS "):
                    rows += [tuple(r) for r in json.loads(line[5:])]
                elif not line.startswith("Summary") and not line.startswith("  " + name + " "):
                    print(line)
    else:
        rows = run(*pairs[0], args, peak) if pairs else []
    print("\nSummary: steps per second, lamina / the best hand-written loop of its backend (target >= 1.0)")
    for name, backend, k, r in rows:
        print(f"  {name:<5} {backend:<6} {k:<16} {r:.2f}")
    if args.peak is not None:
        print("ROWS " + json.dumps(rows))


def run(name, backend, args, peak) -> list:
    """Measure one workload on one backend in this process; prints its section, returns its summary rows."""
    rows = []
    steps = args.steps * WORKLOADS[name]["steps"]
    cands = lamina_candidates(backend, name, steps)
    refs = torch_candidates(name, steps, args.compile) if backend == "torch" else jax_candidates(name, steps)
    again = {}
    if args.noise:  # the issue's reference once more, made afresh: its ratio to the first is the noise floor
        ref = "torch Adam(fused)" if backend == "torch" else ("jax jit+optax" if "jax jit+optax" in refs
                                                               else "jax jit+adam")
        again[ref + " again"] = (torch_candidates(name, steps, False) if backend == "torch"
                                 else jax_candidates(name, steps))[ref]
    times = measure({**cands, **refs, **again}, steps, args.rounds)
    shuffled = SHUFFLED[backend]  # the same work as fit's default (a shuffle each epoch): a reference of its own
    best = min(set(refs) - {shuffled}, key=times.get)  # (never the copy: its ratio to its original is the noise)
    # issue 13's reference: torch.nn + Adam(fused=True) in torch's default layout, jax.jit + optax (or Adam)
    issue = "torch Adam(fused)" if backend == "torch" else best
    print(f"\n[{backend}] {name}   (best hand-written loop: {best})")
    for k, t in times.items():
        line = f"  {k:<20} {t * 1e3:9.3f} ms/step {1 / t:9.1f} steps/s"
        if name == "mlp":
            line += f"  {mlp_flops_per_step() / t / 1e9 / peak:6.1%} of peak"
        if k in cands:
            line += f"   {times[best] / t:.2f}x the best"
            if issue != best:
                line += f", {times[issue] / t:.2f}x {issue}"
            if k.startswith("lamina fit"):
                line += f", {times[shuffled] / t:.2f}x {shuffled}"
            rows.append((name, backend, k, times[best] / t))
        print(line)
    for k in again:
        original = k[:-len(" again")]
        print(f"  noise floor: {original} made and measured twice: the copy at {times[original] / times[k]:.2f}x")
        rows.append((name, backend, "noise (ref/ref)", times[original] / times[k]))
    return rows


if __name__ == "__main__":
    main()
