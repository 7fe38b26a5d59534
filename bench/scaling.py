"""Scaling: steps/s and samples/s of ``lm.fit`` with 1 and 2 processes (torch, DDP over gloo or nccl) and
1, 2, 4 devices (jax, one process, batch sharded over a mesh), for the MLP and CNN workloads of
bench/train_step.py, with the scaling efficiency (samples/s with N / (N x samples/s with 1)).

Weak scaling: every process (torch) or device (jax) gets the workload's batch, so N of them take N times
the rows per step. On a CPU the devices share the same cores: expect efficiency well below 1 (the figure
shows the overhead of the collectives, not a speed-up). On a multi-GPU machine the same script uses
``nccl`` and the real GPUs (torch: one process per GPU; jax: the GPUs it sees). Figures are noisy.

Run: python bench/scaling.py [--backends torch jax] [--workloads mlp cnn] [--steps 20] [--max-devices 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

WORKER = r'''
import json, os, sys, time
sys.path.insert(0, {here!r})
backend, name, steps, devices = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
import lamina as lm
from lamina import distributed as ld
import train_step as ts
if backend == "torch" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
    ld.initialize(timeout=120)
lm.set_backend(backend)
w = ts.WORKLOADS[name]
world = ld.world_size() if backend == "torch" else devices
batch = w["batch"] * (1 if backend == "torch" else devices)
x, y = ts.data(name, steps * (world if backend == "torch" else 1), seed=0)
if backend != "torch":
    x, y = ts.data(name, steps * devices, seed=0)
lm.manual_seed(0)
model = ts.lamina_model(name)
loss = lm.losses.cross_entropy if w["loss"] == "ce" else lm.losses.mse
opt = lm.optim.Adam(model, lr=1e-3)
par = ld.DataParallel(devices=devices) if backend == "jax" else None
run = lambda: lm.fit(model, loss, opt, (x, y), batch_size=batch, progress=False, shuffle=False, parallel=par)
run()  # compile / warm up
t0 = time.perf_counter(); run(); dt = time.perf_counter() - t0
if ld.is_main():
    rows = steps * batch * (world if backend == "torch" else 1)
    print("RESULT", json.dumps({{"steps_s": steps / dt, "samples_s": rows / dt}}))
'''


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(backend, name, steps, n):
    script = os.path.join(tempfile.gettempdir(), f"lamina_scaling_worker_{os.getpid()}.py")
    with open(script, "w") as f:
        f.write(WORKER.format(here=HERE))
    env = {**os.environ}
    if backend == "jax":
        env.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={max(4, n)}")
        cmds = [[sys.executable, script, backend, name, str(steps), str(n)]]
        envs = [env]
    else:
        port = _port()
        cmds, envs = [], []
        for r in range(n):
            cmds.append([sys.executable, script, backend, name, str(steps), str(n)])
            envs.append({**env, "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r),
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c, e in zip(cmds, envs)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for o in outs:
        for line in o.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
    raise RuntimeError("\n".join(outs)[-3000:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["torch", "jax"])
    ap.add_argument("--workloads", nargs="+", default=["mlp", "cnn"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-devices", type=int, default=4)
    args = ap.parse_args()
    print(f"{'backend':8}{'workload':10}{'N':>3}{'steps/s':>10}{'samples/s':>12}{'efficiency':>12}")
    for backend in args.backends:
        counts = [1, 2] if backend == "torch" else [n for n in (1, 2, 4) if n <= args.max_devices]
        for name in args.workloads:
            base = None
            for n in counts:
                t0 = time.perf_counter()
                r = launch(backend, name, args.steps, n)
                base = base or r["samples_s"]
                eff = r["samples_s"] / (n * base)
                print(f"{backend:8}{name:10}{n:>3}{r['steps_s']:>10.1f}{r['samples_s']:>12.0f}{eff:>12.2f}"
                      f"   ({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
