"""The torch engine calls torch's fused Adam / AdamW kernel itself once torch.optim has made the state (the
Python of ``Optimizer.step`` is skipped). References: the same engine going through ``Optimizer.step`` each
time (the same kernel on the same gradients: equal bit for bit), and torch.nn + ``torch.optim.Adam(fused=True)``
/ ``AdamW(fused=True)`` (equal within float32 rounding: torch.nn's matmuls differ from Lamina's in the last
bit)."""

import numpy as np
import pytest

import lamina as lm

torch = pytest.importorskip("torch", reason="the fused kernel is torch's")


@pytest.fixture(autouse=True)
def _on_torch():
    lm.set_backend("torch")


def _pair(seed=0):
    """A Lamina MLP and a torch.nn copy of it (torch.nn's (out, in) weights are Lamina's transposed)."""
    lm.manual_seed(seed)
    net = lm.Sequential(lm.Linear(6, 5), lm.ReLU(), lm.Linear(5, 3))
    ref = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    with torch.no_grad():
        for i in (0, 2):
            ref[i].weight.copy_(torch.from_numpy(net[i].get_parameter("weight").numpy().T))
            ref[i].bias.copy_(torch.from_numpy(net[i].get_parameter("bias").numpy()))
    return net, ref


def _data(steps, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((8, 6)).astype(np.float32), rng.integers(0, 3, 8)) for _ in range(steps)]


def _np(v):
    return lm.get_backend("torch").to_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v)


def _assert_close(net, ref):
    for i in (0, 2):
        np.testing.assert_allclose(net[i].get_parameter("weight").numpy(), ref[i].weight.detach().numpy().T,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(net[i].get_parameter("bias").numpy(), ref[i].bias.detach().numpy(), rtol=1e-5,
                                   atol=1e-6)


def _through_optimizer_step(monkeypatch, run):
    """``run()``'s result with the engine going through ``Optimizer.step`` every time."""
    monkeypatch.setattr("lamina.training.torch._kernel", lambda opt: None)
    try:
        return run()
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("kind", ["Adam", "Adam wd", "AdamW"])
def test_engine_steps_match_torch_fused(monkeypatch, kind):
    """30 steps with a changing learning rate: the first through torch.optim (it makes the state), the rest
    through the kernel itself. Weights, moments and step count equal those of the engine that goes through
    ``Optimizer.step`` each time, and (within rounding) torch.optim's fused optimizer on torch.nn."""
    hyper = {"weight_decay": 0.1} if kind != "Adam" else {}
    cls = lm.optim.AdamW if kind == "AdamW" else lm.optim.Adam

    def run():
        net, ref = _pair()
        opt = cls(net, lr=0.01, schedule=lambda s: 0.01 / (1 + s), **hyper)
        ref_opt = getattr(torch.optim, "AdamW" if kind == "AdamW" else "Adam")(ref.parameters(), lr=0.01,
                                                                              fused=True, **hyper)
        for s, (x, y) in enumerate(_data(30)):
            opt.zero_grad()
            lm.losses.cross_entropy(net(x), y).backward()
            opt.step()
            ref_opt.zero_grad()
            for group in ref_opt.param_groups:
                group["lr"] = 0.01 / (1 + s)
            torch.nn.functional.cross_entropy(ref(torch.from_numpy(x)), torch.from_numpy(y)).backward()
            ref_opt.step()
        _assert_close(net, ref)
        state = opt.state_dict()
        assert float(np.asarray(state["0.weight/step"])) == float(ref_opt.state[ref[0].weight]["step"]) == 30
        return {k: _np(v).copy() for k, v in {**net.state_dict(), **state}.items()}

    want = _through_optimizer_step(monkeypatch, run)
    got = run()
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_a_state_loaded_or_a_parameter_frozen_midway_is_what_the_kernel_steps(monkeypatch):
    """The kernel's lists are made again after a state was loaded (new moment tensors) and after a parameter
    was frozen (a new torch optimizer over the others): the same steps as through ``Optimizer.step``."""
    def run():
        net, _ = _pair()
        opt = lm.optim.Adam(net, lr=0.01)
        for s, (x, y) in enumerate(_data(12)):
            if s == 4:
                opt.load_state_dict({k: np.asarray(_np(v)) * 0.5 for k, v in opt.state_dict().items()})
            if s == 8:
                net[0].get_parameter("bias").trainable = False
            opt.zero_grad()
            lm.losses.cross_entropy(net(x), y).backward()
            opt.step()
        return {k: _np(v).copy() for k, v in {**net.state_dict(), **opt.state_dict()}.items()}

    want = _through_optimizer_step(monkeypatch, run)
    got = run()
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_an_optimizer_hook_still_runs():
    """torch.optim's global step hooks run in ``Optimizer.step`` only: while one is registered, the engine
    goes through it."""
    net, _ = _pair()
    opt = lm.optim.Adam(net, lr=0.01)
    calls = []
    (x, y), = _data(1)
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    for _ in range(2):  # the second step would be the kernel's
        opt.zero_grad()
        lm.losses.cross_entropy(net(x), y).backward()
        handle = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(1))
        try:
            opt.step()
        finally:
            handle.remove()
    assert calls == [1, 1]


def test_a_deep_copy_steps_its_own_tensors():
    """copy.deepcopy((model, opt)) after a backward: stepping the copy leaves the original as it was (the
    kernel is a closure over the engine's tensors; a copy must not share it), and the copy steps as the
    original does."""
    import copy

    net, _ = _pair()
    opt = lm.optim.Adam(net, lr=0.01)
    data = _data(3)
    for x, y in data[:2]:  # the second step is the kernel's
        opt.zero_grad()
        lm.losses.cross_entropy(net(x), y).backward()
        opt.step()
    x, y = data[2]
    opt.zero_grad()
    lm.losses.cross_entropy(net(x), y).backward()
    net2, opt2 = copy.deepcopy((net, opt))
    before = {k: _np(v).copy() for k, v in net.state_dict().items()}
    opt2.zero_grad()
    lm.losses.cross_entropy(net2(x), y).backward()
    opt2.step()
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(_np(v), before[k], err_msg=f"the original changed: {k}")
    opt.step()
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(_np(net2.state_dict()[k]), _np(v), err_msg=k)
