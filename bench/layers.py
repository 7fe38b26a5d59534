"""Forward + backward time of library layers: lamina against torch.nn (torch backend) and hand-written jax
(jax backend, jitted), in one interleaved run.

Cases (as issue 5 names them): Conv2d, batch 64, 32 -> 64 channels, 28x28, 3x3 "same"; LSTM, batch 32,
100 steps, 128 inputs and 128 hidden; MultiHeadAttention, batch 16, 256 tokens, 256 dim, 8 heads.
The figure is reference time / lamina time (higher is better); target at least 0.9.
On jax both sides are ``jax.jit(jax.grad(...))`` of the same loss; lamina's side runs the model through
``lm.functional_call``, as its compiled train step does.

Run: python bench/layers.py [--backends torch jax] [--rounds 5] [--only conv lstm mha] [--device cuda:0]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved  # noqa: E402

import lamina as lm  # noqa: E402

CASES = {
    "conv": ("Conv2d 32->64, 3x3, batch 64, 28x28", (64, 32, 28, 28), lambda: lm.Conv2d(64, 3, padding="same")),
    "lstm": ("LSTM 128 hidden, batch 32, 100 steps", (32, 100, 128), lambda: lm.LSTM(128)),
    "mha": ("MultiHeadAttention 256 dim, 8 heads, batch 16, 256 tokens", (16, 256, 256),
            lambda: lm.MultiHeadAttention(256, 8)),
}


def first(y):
    return y[0] if isinstance(y, tuple) else y


def torch_reference(name, layer, device="cpu"):
    import torch

    sd = {k: torch.from_numpy(np.array(v.detach().cpu().numpy())) for k, v in layer.state_dict().items()}
    if name == "conv":
        ref = torch.nn.Conv2d(32, 64, 3, padding="same")
        ref.load_state_dict(sd)
        ref.to(device)
        return lambda x: ref(x)
    if name == "lstm":
        ref = torch.nn.LSTM(128, 128, batch_first=True)
        ref.load_state_dict(sd)
        ref.to(device)
        return lambda x: ref(x)[0]
    ref = torch.nn.MultiheadAttention(256, 8, batch_first=True)
    ref.load_state_dict({"in_proj_weight": sd["in_proj_weight"], "in_proj_bias": sd["in_proj_bias"],
                         "out_proj.weight": sd["out_proj_weight"], "out_proj.bias": sd["out_proj_bias"]})
    ref.to(device)
    return lambda x: ref(x, x, x, need_weights=False)[0]


def bench_torch(name, rounds, device="cpu"):
    import torch

    lm.set_backend("torch")
    lm.manual_seed(0)
    title, shape, make = CASES[name]
    layer = make()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32)).to(device)
    layer.build(shape)
    ref = torch_reference(name, layer, device)
    layer.to(device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run_lamina():
        first(layer(x)).sum().backward()
        sync()

    def run_ref():
        ref(x).sum().backward()
        sync()

    t = interleaved({"lamina": run_lamina, "torch.nn": run_ref}, number=3, rounds=rounds, warmup=1)
    return title, t


def jax_reference(name, params):
    import jax
    import jax.numpy as jnp

    if name == "conv":
        def f(p, x):
            y = jax.lax.conv_general_dilated(x, p["weight"], (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
            return (y + p["bias"][None, :, None, None]).sum()
    elif name == "lstm":
        def f(p, x):
            proj = x @ p["weight_ih_l0"].T + p["bias_ih_l0"]
            w_hh_t, b_hh = p["weight_hh_l0"].T, p["bias_hh_l0"]

            def step(carry, p_t):
                h, c = carry
                z = p_t + h @ w_hh_t + b_hh
                i, f_, g, o = jnp.split(z, 4, axis=-1)
                c = jax.nn.sigmoid(f_) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
                h = jax.nn.sigmoid(o) * jnp.tanh(c)
                return (h, c), h

            zeros = jnp.zeros((x.shape[0], 128), x.dtype)
            _, hs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(proj, 0, 1))
            return hs.sum()
    else:
        def f(p, x):
            qkv = x @ p["in_proj_weight"].T + p["in_proj_bias"]
            q, k, v = (t.reshape(16, 256, 8, 32) for t in jnp.split(qkv, 3, axis=-1))
            out = jax.nn.dot_product_attention(q, k, v).reshape(16, 256, 256)
            return (out @ p["out_proj_weight"].T + p["out_proj_bias"]).sum()
    return jax.jit(jax.grad(f))


def bench_jax(name, rounds):
    import jax

    lm.set_backend("jax")
    lm.manual_seed(0)
    title, shape, make = CASES[name]
    layer = make()
    x = jax.numpy.asarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    layer.build(shape)
    params = layer.state_dict()
    ours = jax.jit(jax.grad(lambda p, v: first(lm.functional_call(layer, p, v)).sum()))
    ref = jax_reference(name, params)
    t = interleaved({"lamina": lambda: jax.block_until_ready(ours(params, x)),
                     "jax.jit": lambda: jax.block_until_ready(ref(params, x))}, number=3, rounds=rounds, warmup=1)
    return title, t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="*", choices=["torch", "jax"],
                    default=[b for b in lm.available_backends() if b in ("torch", "jax")])
    ap.add_argument("--only", nargs="*", default=list(CASES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="torch's device, e.g. cuda:0 (jax uses its default device)")
    args = ap.parse_args()
    summary = []
    for name in args.only:
        for backend in args.backends:
            if backend == "torch":
                title, t = bench_torch(name, args.rounds, args.device)
            else:
                title, t = bench_jax(name, args.rounds)
            ref = "torch.nn" if backend == "torch" else "jax.jit"
            ratio = t[ref] / t["lamina"]
            print(f"[{backend}] {title}: lamina {t['lamina'] * 1e3:.2f} ms, {ref} {t[ref] * 1e3:.2f} ms, "
                  f"ratio {ratio:.3f}", flush=True)
            summary.append((backend, title, ratio))
    print("\nSummary (reference time / lamina time; target >= 0.9)")
    for backend, title, ratio in summary:
        print(f"  {backend:<5} {title:<58} {ratio:.3f}")


if __name__ == "__main__":
    main()
