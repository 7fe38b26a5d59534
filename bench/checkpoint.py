"""Checkpoint save and load of a ~100M-parameter float32 model: lamina against safetensors and torch.

Times lm.save / lm.load_into / lm.load against safetensors.numpy.save_file / load_file and torch.save /
torch.load (a state dict of torch tensors) in one interleaved run, and prints the ratios. It also prints each
operation's peak memory above the resident model (Linux: the VmHWM high-water mark, reset before each
operation through /proc/self/clear_refs). Targets: within 1.2x of safetensors' own time; peak memory no more
than 1.5x the model's size (model + extra). lm.save flushes to disk before its rename (durable=True, the
default) and safetensors and torch do not, so lm.save is also timed with durable=False, which is the
like-for-like comparison.

Run: python bench/checkpoint.py [--backend torch] [--layers 6] [--width 4096] [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time

import lamina as lm


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def measure(fn):
    """(seconds, peak bytes above the RSS at the start) of one call of ``fn``."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark to the current RSS
    except OSError:
        pass
    before = _status("VmRSS")
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    peak = _status("VmHWM") - before
    del result
    return elapsed, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="folder for the files (default: the system temp folder)")
    args = ap.parse_args()

    import safetensors.numpy
    import torch

    lm.set_backend(args.backend)
    lm.manual_seed(0)
    model = lm.Sequential([lm.Linear(args.width, args.width) for _ in range(args.layers)])
    model.build((None, args.width))
    n_params = sum(p.size for p in model.parameters())
    size = n_params * 4
    print(f"model: {args.layers} x Linear({args.width}, {args.width}) = {n_params / 1e6:.1f}M float32 parameters, "
          f"{size / 2**20:.0f} MiB, on the {args.backend} backend")
    b = lm.get_backend()
    host = {k: b.to_numpy(v) for k, v in model.state_dict().items()}  # zero-copy views on CPU
    as_torch = {k: torch.from_numpy(v) for k, v in host.items()}

    folder = tempfile.mkdtemp(dir=args.dir)
    paths = {name: os.path.join(folder, name) for name in ("lamina.st", "safetensors.st", "torch.pt")}
    ops = {
        "save": {
            "lamina lm.save": lambda: lm.save(model, paths["lamina.st"]),
            "lamina durable=False": lambda: lm.save(model, paths["lamina.st"], durable=False),
            "safetensors save_file": lambda: safetensors.numpy.save_file(host, paths["safetensors.st"]),
            "torch.save": lambda: torch.save(as_torch, paths["torch.pt"]),
        },
        "load": {
            "lamina lm.load_into": lambda: lm.load_into(model, paths["lamina.st"]),
            "lamina lm.load": lambda: lm.load(paths["lamina.st"]),
            "safetensors load_file": lambda: safetensors.numpy.load_file(paths["safetensors.st"]),
            "torch.load": lambda: torch.load(paths["torch.pt"], weights_only=True),
        },
    }
    results = {}
    try:
        for op, cands in ops.items():
            samples = {name: [] for name in cands}
            peaks = {name: [] for name in cands}
            for _ in range(args.rounds):
                for name, fn in cands.items():
                    t, peak = measure(fn)
                    samples[name].append(t)
                    peaks[name].append(peak)
            results[op] = {name: (statistics.median(samples[name]), max(peaks[name])) for name in cands}
    finally:
        for p in paths.values():
            if os.path.exists(p):
                os.remove(p)
        os.rmdir(folder)

    ref = {"save": "safetensors save_file", "load": "safetensors load_file"}
    for op, rows in results.items():
        print(f"\n{op}")
        base = rows[ref[op]][0]
        for name, (t, peak) in rows.items():
            print(f"  {name:<24} {t:7.3f} s   x{t / base:5.2f} of safetensors   peak above model "
                  f"{peak / 2**20:7.1f} MiB = {peak / size:4.2f}x model (total {1 + peak / size:4.2f}x)")
    save_ratio = results["save"]["lamina durable=False"][0] / results["save"][ref["save"]][0]
    durable_ratio = results["save"]["lamina lm.save"][0] / results["save"][ref["save"]][0]
    load_ratio = results["load"]["lamina lm.load_into"][0] / results["load"][ref["load"]][0]
    peak = max(results["save"]["lamina lm.save"][1], results["load"]["lamina lm.load_into"][1])
    print(f"\nSummary: save x{save_ratio:.2f} (durable=True: x{durable_ratio:.2f}, the disk flush), "
          f"load_into x{load_ratio:.2f} of safetensors (target <= 1.2); "
          f"peak memory {1 + peak / size:.2f}x the model (target <= 1.5)")


if __name__ == "__main__":
    main()
