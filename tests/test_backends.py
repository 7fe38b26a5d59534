"""Backend selection, conversion of inputs, and moving models between backends."""

import os
import subprocess
import sys

import numpy as np
import pytest

import lamina as lm

from conftest import BACKENDS, MyLinear, rand, to_np


def run_py(code, **env):
    full = {**os.environ, **env}
    full.pop("LAMINA_BACKEND", None) if "LAMINA_BACKEND" not in env else None
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full)


def test_default_backend_is_first_installed_of_torch_jax_numpy():
    out = run_py("import lamina as lm; print(lm.Linear(2).backend)")
    assert out.stdout.strip() == lm.available_backends()[0]


@pytest.mark.parametrize("name", BACKENDS)
def test_lamina_backend_environment_variable(name):
    out = run_py("import lamina as lm; print(lm.Linear(2).backend)", LAMINA_BACKEND=name)
    assert out.stdout.strip() == name


def test_bad_backend_names_give_clear_errors():
    with pytest.raises(lm.BackendError, match=r"unknown backend 'mxnet'; choose one of"):
        lm.set_backend("mxnet")
    out = run_py("import lamina as lm; lm.Linear(2)", LAMINA_BACKEND="mxnet")
    assert "LAMINA_BACKEND='mxnet' is not a backend" in out.stderr


def test_numpy_arrays_and_lists_become_backend_arrays_float32(backend):
    layer = lm.Identity()
    for given in (np.arange(3.0), [1.0, 2.0, 3.0]):
        out = layer(given)
        assert lm.backend_of(out).name == backend
        if backend != "numpy":  # numpy arrays are native on the numpy backend and pass unchanged
            assert to_np(out).dtype == np.float32
    assert to_np(layer([1, 2])).dtype.kind == "i"
    assert to_np(layer([1.0, 2.0])).dtype == np.float32  # lists: float32 on every backend


def test_parameters_default_to_float32(backend):
    layer = MyLinear(3, 2)
    assert to_np(layer.weight).dtype == np.float32 and layer.get_parameter("weight").dtype == "float32"


def foreign_array(owner):
    return lm.get_backend(owner).from_numpy(np.ones((2, 3), np.float32))


@pytest.mark.parametrize(("model_backend", "input_backend"),
                         [(m, i) for m in BACKENDS for i in BACKENDS if i not in ("numpy", m)])
def test_array_of_another_framework_is_an_error_naming_both(model_backend, input_backend):
    lm.set_backend(model_backend)
    net = lm.Sequential(lm.Linear(3, 2))
    with pytest.raises(lm.BackendError) as err:
        net(foreign_array(input_backend))
    msg = str(err.value)
    assert f"{model_backend} backend" in msg and lm.get_backend(input_backend).array_name in msg
    assert f"model.to(backend='{input_backend}')" in msg


@pytest.mark.parametrize("src", BACKENDS)
@pytest.mark.parametrize("dst", BACKENDS)
def test_to_backend_keeps_outputs_and_ties(src, dst):
    lm.set_backend(src)
    shared = lm.Linear(6, 6)
    net = lm.Sequential(lm.Linear(6), lm.ReLU(), shared, lm.ReLU(), shared, lm.TensorReduction(2))
    x = rand(3, 5)
    before = to_np(net(x))
    net.to(backend=dst)
    assert net.backend == dst and all(m.backend == dst for m in net.modules())
    for _, p in net.named_parameters():
        assert lm.backend_of(p.value).name == dst
    assert net[2].weight is net[4].weight
    out = net(x)
    assert lm.backend_of(out).name == dst
    np.testing.assert_allclose(to_np(out), before, rtol=1e-5, atol=1e-6)


def test_move_from_numpy_to_torch_copies_so_a_held_array_is_never_written():
    """Issue 10: moving used to share memory through DLPack, and torch training then wrote under the
    NumPy array the user still held. A move copies now."""
    if not {"torch", "numpy"} <= set(BACKENDS):
        pytest.skip("needs torch")
    import torch

    lm.set_backend("numpy")
    layer = lm.Linear(4, 4)
    host = layer.weight
    before = host.copy()
    layer.to(backend="torch")
    assert layer.weight.data_ptr() != host.ctypes.data
    with torch.no_grad():
        layer.weight.mul_(2.0)
    np.testing.assert_array_equal(host, before)


def test_to_numpy_gives_writable_parameters():
    for src in BACKENDS:
        lm.set_backend(src)
        layer = lm.Linear(2, 2).to(backend="numpy")
        layer.weight[0, 0] = 5.0  # parameters must stay writable on the numpy backend
        assert layer.weight[0, 0] == 5.0


def test_adding_a_child_of_another_backend_is_refused():
    if len(BACKENDS) < 2:
        pytest.skip("needs two backends")
    lm.set_backend(BACKENDS[0])
    parent = lm.Sequential()
    lm.set_backend(BACKENDS[1])
    child = lm.Linear(2)
    with pytest.raises(lm.BackendError, match=rf"on the {BACKENDS[1]} backend.*\.to\(backend='{BACKENDS[0]}'\)"):
        parent.append(child)


@pytest.mark.parametrize("channels_last", [True, False])
def test_torch_cpu_convolutions_in_channels_last_memory_give_torch_nn_results(monkeypatch, channels_last):
    """On the CPU the torch backend runs 2-D convolutions on channels-last memory (faster there; the shape stays
    (N, C, H, W)). The outputs, the flattened features (in (C, H, W) order) and the gradients are torch.nn's,
    computed in torch's default layout."""
    if "torch" not in BACKENDS:
        pytest.skip("torch not selected")
    import torch

    import lamina.backends.torch as tb

    monkeypatch.setattr(tb, "CONV2D_CHANNELS_LAST_ON_CPU", channels_last)
    lm.set_backend("torch")
    lm.manual_seed(0)
    net = lm.Sequential(lm.Conv2d(1, 4, 3), lm.ReLU(), lm.MaxPool2d(2), lm.Conv2d(4, 6, 3, padding=1), lm.ReLU(),
                        lm.Flatten(), lm.Linear(5))
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 1, 10, 10)).astype(np.float32))
    net.ensure_built(x)
    ref = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(96, 5))
    with torch.no_grad():
        for i in (0, 3):
            ref[i].weight.copy_(net[i].weight)
            ref[i].bias.copy_(net[i].bias)
        ref[6].weight.copy_(net[6].weight.T)  # Lamina's Linear weight is (in, out)
        ref[6].bias.copy_(net[6].bias)
    features = net[:6](x)
    assert features.shape == (3, 96)
    assert net[0](x).is_contiguous(memory_format=torch.channels_last) == channels_last
    np.testing.assert_allclose(to_np(features), ref[:6](x).detach().numpy(), rtol=1e-5, atol=1e-6)
    net(x).square().sum().backward()
    ref(x).square().sum().backward()
    for i in (0, 3):
        np.testing.assert_allclose(to_np(net[i].weight.grad), ref[i].weight.grad.numpy(), rtol=1e-4, atol=1e-5)
