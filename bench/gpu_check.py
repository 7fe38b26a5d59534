"""GPU paths, checked where a GPU exists: on torch and jax, move a model to the GPU, run it, compare with
the CPU, save it from the GPU, load it back onto the GPU and the CPU, and check that mixing devices gives
a DeviceError naming both. Prints every check; exits non-zero if one fails; says so when no GPU is found.

Run: python bench/gpu_check.py
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

import lamina as lm


class MyLinear(lm.Module):
    def __init__(self, in_units, units):
        super().__init__()
        self.weight = lm.Parameter((in_units, units), init=lm.init.normal())
        self.bias = lm.Parameter((units,), init=lm.init.normal())

    def forward(self, X):
        return lm.ops.relu(X @ self.weight + self.bias)


def check(backend: str) -> list[str]:
    lm.set_backend(backend)
    b = lm.get_backend()
    gpus = [d for d in lm.devices() if d != "cpu"]
    if not gpus:
        return [f"{backend}: no GPU found (devices: {lm.devices()}); nothing to check"]
    gpu, done = gpus[0], []
    lm.manual_seed(0)
    net = lm.Sequential(lm.Linear(64), lm.ReLU(), MyLinear(64, 8), lm.TensorReduction(2))
    x = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    cpu_out = b.to_numpy(net(x))
    net.to(device=gpu)
    assert net.device == gpu, net.device
    assert all(p.device == gpu for p in net.parameters())
    done.append(f"{backend}: model moved to {gpu}; every parameter is there")
    out = net(b.to_device(b.from_numpy(x), gpu))
    assert b.device_of(out) == gpu
    np.testing.assert_allclose(b.to_numpy(out), cpu_out, rtol=2e-3, atol=2e-3)  # TF32 matmuls on GPU
    done.append(f"{backend}: forward on {gpu} matches the CPU within 2e-3")
    if b.has_autodiff:
        _, grads = lm.value_and_grad(lambda m, v: (m(v) ** 2).sum())(net, b.to_device(b.from_numpy(x), gpu))
        assert all(b.device_of(g) == gpu for g in grads.values())
        done.append(f"{backend}: gradients computed on {gpu}")
    try:
        net(b.from_numpy(x))  # a CPU input
        if backend == "torch":
            raise AssertionError("a CPU input to a GPU model was not refused")
        done.append(f"{backend}: a CPU input is accepted (jax moves committed arrays itself)")
    except lm.DeviceError as e:
        assert "cpu" in str(e) and gpu in str(e), str(e)
        done.append(f"{backend}: a CPU input gives DeviceError naming both devices")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "gpu.safetensors")
        lm.save(net, path)
        clone = lm.Sequential(lm.Linear(64), lm.ReLU(), MyLinear(64, 8), lm.TensorReduction(2)).to(device=gpu)
        lm.load_into(clone, path)
        assert clone.device == gpu
        np.testing.assert_allclose(b.to_numpy(clone(b.to_device(b.from_numpy(x), gpu))), b.to_numpy(out),
                                   rtol=1e-6, atol=1e-6)
        done.append(f"{backend}: saved from {gpu}, loaded onto {gpu}: same outputs")
        on_cpu = lm.Sequential(lm.Linear(64), lm.ReLU(), MyLinear(64, 8), lm.TensorReduction(2))
        lm.load_into(on_cpu, path)
        np.testing.assert_allclose(b.to_numpy(on_cpu(x)), cpu_out, rtol=2e-3, atol=2e-3)
        done.append(f"{backend}: the GPU checkpoint loads on the CPU too")
    net.to(device="cpu")
    np.testing.assert_allclose(b.to_numpy(net(x)), cpu_out, rtol=1e-6)
    done.append(f"{backend}: moved back to the CPU: outputs as before")
    return done


def main() -> int:
    failed = False
    for backend in [b for b in ("torch", "jax") if b in lm.available_backends()]:
        try:
            for line in check(backend):
                print("ok  ", line)
        except Exception as e:  # report and go on to the next backend
            failed = True
            print(f"FAIL {backend}: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
