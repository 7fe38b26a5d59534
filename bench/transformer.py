"""Inference of a Transformer encoder block: lamina eager and ``lm.compile``d against hand-written code.

The block (post-norm, as ``torch.nn.TransformerEncoderLayer`` with ``norm_first=False``, no dropout):
    h = LayerNorm(x + MultiHeadAttention(x));  out = LayerNorm(h + Linear(ReLU(Linear(h))))
with d_model 128, 4 heads, feed-forward 512, sequence 64, batch 16, float32, in eval mode.

Candidates, per backend:
  lamina eager        the block written with lamina layers, called as it is
  lamina compile      ``lm.compile(block)`` (jax: jax.jit of functional_call; torch: torch.compile)
  torch nn            torch.nn.TransformerEncoderLayer(batch_first=True) under torch.no_grad (eval mode)
  torch nn compile    (with --compile) torch.compile of it
  jax jit             the same block written by hand in jax.numpy, under jax.jit
  (numpy: lamina eager only; lm.compile returns the model itself)

Times are medians of interleaved rounds (bench/_timing.py), milliseconds per forward. The machine is
shared: expect +-20% between runs; compare the ratios within one run.

Run: python bench/transformer.py [--backends torch jax numpy] [--rounds 7] [--compile]
"""

from __future__ import annotations

import argparse

import numpy as np
from _timing import interleaved

import lamina as lm

D, HEADS, FF, SEQ, BATCH = 128, 4, 512, 64, 16


class EncoderBlock(lm.Module):
    """Post-norm Transformer encoder block, as torch.nn.TransformerEncoderLayer (ReLU, no dropout)."""

    def __init__(self, d=D, heads=HEADS, ff=FF):
        super().__init__()
        self.attention = lm.MultiHeadAttention(d, heads)
        self.norm1, self.norm2 = lm.LayerNorm(d), lm.LayerNorm(d)
        self.ff1, self.ff2 = lm.Linear(d, ff), lm.Linear(ff, d)

    def forward(self, x):
        h = self.norm1(x + self.attention(x))
        return self.norm2(h + self.ff2(lm.ops.relu(self.ff1(h))))


def lamina_candidates(backend, x, with_compile):
    lm.set_backend(backend)
    lm.manual_seed(0)
    block = EncoderBlock().eval()
    b = lm.get_backend(backend)
    xb = b.from_numpy(x)
    out = {"lamina eager": lambda: b.to_numpy(block(xb))}
    fast = lm.compile(block)
    if fast is not block and (with_compile or backend != "torch"):
        np.testing.assert_allclose(b.to_numpy(fast(xb)), b.to_numpy(block(xb)), rtol=2e-4, atol=2e-4)
        out["lamina compile"] = lambda: b.to_numpy(fast(xb))
    return out


def torch_candidates(x, with_compile):
    import torch

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True).eval()
    xt = torch.from_numpy(x)

    def run(f):
        def call():
            with torch.no_grad():
                return f(xt).numpy()
        return call

    out = {"torch nn": run(layer)}
    if with_compile:
        out["torch nn compile"] = run(torch.compile(layer))
    return out


def jax_candidates(x):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)

    def w(*shape):
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32) * shape[0] ** -0.5)

    p = {"qkv": w(D, 3 * D), "qkv_b": jnp.zeros(3 * D), "o": w(D, D), "o_b": jnp.zeros(D),
         "f1": w(D, FF), "f1_b": jnp.zeros(FF), "f2": w(FF, D), "f2_b": jnp.zeros(D),
         "g1": jnp.ones(D), "b1": jnp.zeros(D), "g2": jnp.ones(D), "b2": jnp.zeros(D)}

    def norm(h, g, b):
        m = h.mean(-1, keepdims=True)
        v = ((h - m) ** 2).mean(-1, keepdims=True)
        return (h - m) / jnp.sqrt(v + 1e-5) * g + b

    @jax.jit
    def block(p, x):
        n, s, _ = x.shape
        q, k, v = jnp.split(x @ p["qkv"] + p["qkv_b"], 3, axis=-1)
        heads = lambda t: t.reshape(n, s, HEADS, D // HEADS).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        a = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / (D // HEADS) ** 0.5, axis=-1) @ v
        a = a.transpose(0, 2, 1, 3).reshape(n, s, D) @ p["o"] + p["o_b"]
        h = norm(x + a, p["g1"], p["b1"])
        return norm(h + jax.nn.relu(h @ p["f1"] + p["f1_b"]) @ p["f2"] + p["f2_b"], p["g2"], p["b2"])

    xj = jnp.asarray(x)
    return {"jax jit": lambda: np.asarray(block(p, xj))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="*", default=[b for b in lm.available_backends()
                                                     if b in ("torch", "jax", "numpy")])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--number", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also torch.compile (slow to compile on CPU)")
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((BATCH, SEQ, D)).astype(np.float32)
    for backend in args.backends:
        cands = lamina_candidates(backend, x, args.compile)
        if backend == "torch":
            cands.update(torch_candidates(x, args.compile))
        elif backend == "jax":
            cands.update(jax_candidates(x))
        times = interleaved(cands, args.number, args.rounds, warmup=2)
        best = min((k for k in times if not k.startswith("lamina")), key=times.get, default=None)
        print(f"\n[{backend}] Transformer encoder block forward, batch {BATCH}, seq {SEQ}, d_model {D}")
        for k, t in times.items():
            line = f"  {k:<18} {t * 1e3:8.3f} ms"
            if best is not None and k.startswith("lamina"):
                line += f"   {times[best] / t:.2f}x the speed of {best}"
            print(line)


if __name__ == "__main__":
    main()
