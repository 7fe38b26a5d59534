"""model.summary and the "Devices" part of the builders' guide."""

import numpy as np
import pytest

import lamina as lm

from conftest import BACKENDS, MyLinear, rand, to_np


def test_summary_builds_lazy_model_and_counts_tied_once(backend):
    shared = lm.Linear(8, 8)
    net = lm.Sequential(lm.Linear(8), lm.ReLU(), shared, shared, MyLinear(8, 2))
    lines = []
    text = net.summary((None, 5), print_fn=lines.append)
    assert lines == [text]
    assert net.get_parameter("0.weight").shape == (5, 8)
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:-3]}
    assert rows["0"][1:] == ["Linear", "(1,", "8)", "48"]
    assert rows["2"][-1] == "72" and rows["3"][-1] == "0"  # the shared layer's parameters counted once
    assert rows["4"][1] == "MyLinear" and rows["4"][-1] == "18"
    total = 5 * 8 + 8 + 8 * 8 + 8 + 8 * 2 + 2
    assert f"Total parameters: {total:,} ({total * 4} B), trainable: {total:,}" in text
    assert all(m.training for m in net.modules())


def test_summary_reports_frozen_parameters_and_buffers(backend):
    net = lm.Sequential(lm.Linear(3, 3))
    net.get_parameter("0.bias").trainable = False
    text = net.summary((2, 3), print_fn=None)
    assert "Total parameters: 12 (48 B), trainable: 9" in text
    assert "Buffers: 0 B" in text


def test_devices_and_model_device(backend):
    devs = lm.devices()
    assert devs[0] == "cpu" and all(isinstance(d, str) for d in devs)
    net = lm.Sequential(lm.Linear(3, 2))
    assert net.device == "cpu"
    net.to(device="cpu")
    out = net(rand(1, 3))
    assert lm.get_backend().device_of(out) == "cpu"
    assert lm.devices("numpy") == ["cpu"]


def test_model_on_gpu_when_one_exists(backend):
    gpus = [d for d in lm.devices() if d != "cpu"]
    if not gpus:
        pytest.skip(f"no GPU on this machine for the {backend} backend (bench/gpu_check.py covers GPUs)")
    net = lm.Sequential(lm.Linear(3, 2)).to(device=gpus[0])
    assert net.device == gpus[0]
    np.testing.assert_allclose(to_np(net(rand(1, 3))), to_np(net.to(device="cpu")(rand(1, 3))), rtol=1e-5)


@pytest.mark.skipif("torch" not in BACKENDS, reason="torch not installed")
def test_mixing_devices_names_both():
    import torch

    lm.set_backend("torch")
    net = lm.Sequential(MyLinear(3, 2))
    net(rand(1, 3))
    with pytest.raises(lm.DeviceError, match="on device 'cpu' but got an input on device 'meta'"):
        net(torch.zeros(1, 3, device="meta"))
