"""Parameter memory order: ``Linear``'s (in, out) weight lives in column-major memory on torch (the memory of
``torch.nn.Linear``'s (out, in) weight), with the same values, gradients, updates, optimizer state and
checkpoints as a row-major one. References: NumPy and torch.nn + torch.optim."""

import copy

import numpy as np
import pytest

import lamina as lm

torch = pytest.importorskip("torch", reason="memory order is a torch matter (strided tensors)")
F = torch.nn.functional


def column_major(t) -> bool:
    return tuple(t.stride()) == (1, t.shape[0])


@pytest.fixture(autouse=True)
def _on_torch(monkeypatch):
    lm.set_backend("torch")
    monkeypatch.setattr("lamina.backends.torch.COLUMN_MAJOR_FROM", 1)  # the small test layers column-major too


def test_linear_weights_are_column_major_from_a_size_on(monkeypatch):
    monkeypatch.setattr("lamina.backends.torch.COLUMN_MAJOR_FROM", 4096)
    small, large, lazy = lm.Linear(64, 8), lm.Linear(784, 512), lm.Linear(10)
    lazy(np.zeros((2, 512), np.float32))  # built on the input: 512 x 10
    assert small.weight.is_contiguous() and column_major(large.weight) and column_major(lazy.weight)


def data(rows=16, width=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, width)).astype(np.float32), rng.integers(0, classes, rows)


def test_order_is_checked():
    with pytest.raises(ValueError, match="order is 'C'"):
        lm.Parameter((3,), order="F")  # column-major is for matrices
    with pytest.raises(ValueError, match="order is 'C'"):
        lm.Parameter((3, 2), order="K")
    assert lm.Parameter((3, 2)).order == "C" and lm.Parameter((3, 2), order="F").order == "F"


def test_linear_weight_stays_column_major_with_the_same_values(tmp_path):
    x, _ = data()
    net = lm.Sequential(lm.Linear(5, 4), lm.ReLU(), lm.Linear(3))  # the second one lazy: built on x
    out = net(x)
    w0, b0, w1, b1 = (net.get_parameter(k).numpy() for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    np.testing.assert_allclose(out.detach().numpy(), np.maximum(x @ w0 + b0, 0) @ w1 + b1, rtol=1e-5, atol=1e-6)
    assert column_major(net[0].weight) and column_major(net[2].weight)
    assert net[0].weight.shape == (5, 4) and net.get_parameter("0.weight").shape == (5, 4)

    new = np.arange(20, dtype=np.float32).reshape(5, 4)
    net.get_parameter("0.weight").value = new  # assigned: copied into the column-major memory
    assert column_major(net[0].weight)
    np.testing.assert_array_equal(net[0].weight.detach().numpy(), new)

    lm.save(net, tmp_path / "net.safetensors")
    stored = lm.load(tmp_path / "net.safetensors", backend="numpy")
    np.testing.assert_array_equal(stored["0.weight"], new)  # the file holds (in, out) row by row
    clone = lm.Sequential(lm.Linear(5, 4), lm.ReLU(), lm.Linear(3))
    lm.load_into(clone, tmp_path / "net.safetensors")
    assert column_major(clone[0].weight) and column_major(clone[2].weight)
    np.testing.assert_array_equal(clone.get_parameter("0.weight").numpy(), new)

    state = {k: np.asarray(v.detach().numpy()) + 1 for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    assert column_major(net[0].weight)
    np.testing.assert_array_equal(net.get_parameter("0.weight").numpy(), new + 1)

    twin = copy.deepcopy(net)
    assert column_major(twin[0].weight)
    np.testing.assert_array_equal(twin.get_parameter("0.weight").numpy(), new + 1)

    on_numpy = copy.deepcopy(net).to(backend="numpy")  # through DLPack or the host: the values, not the memory
    np.testing.assert_array_equal(on_numpy.get_parameter("0.weight").numpy(), new + 1)


def _twins(sizes=(5, 7, 3), seed=1):
    """A Lamina MLP and a torch.nn one with the same weights (torch.nn's are the transposes)."""
    lm.manual_seed(seed)
    net = lm.Sequential(lm.Linear(sizes[0], sizes[1]), lm.ReLU(), lm.Linear(sizes[1], sizes[2]))
    ref = torch.nn.Sequential(torch.nn.Linear(sizes[0], sizes[1]), torch.nn.ReLU(), torch.nn.Linear(sizes[1], sizes[2]))
    with torch.no_grad():
        for i in (0, 2):
            ref[i].weight.copy_(torch.from_numpy(net.get_parameter(f"{i}.weight").numpy().T.copy()))
            ref[i].bias.copy_(torch.from_numpy(net.get_parameter(f"{i}.bias").numpy()))
    return net, ref


def test_fit_matches_torch_nn_and_torch_optim_with_the_state_laid_out_as_the_parameters():
    x, y = data(rows=64)
    net, ref = _twins()
    opt = lm.optim.Adam(net, lr=0.01)
    lm.fit(net, lm.losses.cross_entropy, opt, (x, y), batch_size=16, shuffle=False, epochs=3, progress=False)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01, foreach=False)
    for _ in range(3):
        for i in range(0, 64, 16):
            ref_opt.zero_grad()
            F.cross_entropy(ref(torch.from_numpy(x[i:i + 16])), torch.from_numpy(y[i:i + 16])).backward()
            ref_opt.step()
    for i in (0, 2):
        assert column_major(net[i].weight)
        np.testing.assert_allclose(net.get_parameter(f"{i}.weight").numpy(), ref[i].weight.detach().numpy().T,
                                   rtol=1e-5, atol=1e-6)
        moments = opt.state_dict()
        for slot in ("exp_avg", "exp_avg_sq"):  # shaped (in, out) as the weight, with torch.optim's values
            ours = np.asarray(moments[f"{i}.weight/{slot}"].detach().numpy())
            assert ours.shape == net.get_parameter(f"{i}.weight").shape
            np.testing.assert_allclose(ours, ref_opt.state[ref[i].weight][slot].numpy().T, rtol=1e-5, atol=1e-7)


def train(net, opt, epochs):
    x, y = data(rows=48)
    lm.fit(net, lm.losses.cross_entropy, opt, (x, y), batch_size=16, shuffle=False, epochs=epochs, progress=False)


def test_training_resumed_from_a_checkpoint_continues_the_same_updates(tmp_path):
    whole, _ = _twins()
    train(whole, lm.optim.Adam(whole, lr=0.01), 4)

    first, _ = _twins()
    first_opt = lm.optim.Adam(first, lr=0.01)
    train(first, first_opt, 2)
    lm.save(first, tmp_path / "ckpt.safetensors", optimizer=first_opt)
    resumed, _ = _twins(seed=7)  # other weights: all of them come from the file
    resumed_opt = lm.optim.Adam(resumed, lr=0.01)
    lm.load_into(resumed, tmp_path / "ckpt.safetensors", optimizer=resumed_opt)
    train(resumed, resumed_opt, 2)
    for k, p in whole.named_parameters():
        np.testing.assert_allclose(resumed.get_parameter(k).numpy(), p.numpy(), rtol=1e-6, atol=1e-7)


def test_gradients_of_a_column_major_weight_and_a_users_own_loop():
    x, y = data()
    net, ref = _twins()
    loss = lambda m, xb, yb: lm.losses.cross_entropy(m(xb), yb)  # noqa: E731
    value, grads = lm.value_and_grad(loss)(net, torch.from_numpy(x), torch.from_numpy(y))
    F.cross_entropy(ref(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    np.testing.assert_allclose(grads["0.weight"].detach().numpy(), ref[0].weight.grad.numpy().T, rtol=1e-5, atol=1e-7)
    assert grads["0.weight"].shape == (5, 7)

    # opt.step with these gradients, and with row-major copies of them (a user's own): the same update
    twin = copy.deepcopy(net)
    opt, twin_opt = lm.optim.Adam(net, lr=0.01), lm.optim.Adam(twin, lr=0.01)
    opt.step(grads)
    twin_opt.step({k: g.detach().contiguous() for k, g in grads.items()})
    for k, p in net.named_parameters():
        np.testing.assert_array_equal(twin.get_parameter(k).numpy(), p.numpy())
    assert column_major(net[0].weight) and column_major(twin[0].weight)


def test_a_gradient_laid_out_unlike_its_parameter_gives_torch_optims_update():
    """torch's fused Adam (2.13, CPU) reads a gradient as laid out like its parameter, and silently updates wrong
    from a transposed one; the engine hands it gradients in the parameter's layout."""
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((6, 4)).astype(np.float32)
    p = lm.Parameter(value=w0)  # row-major
    t = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt, ref = lm.optim.Adam([p], lr=0.1), torch.optim.Adam([t], lr=0.1, foreach=False)
    for _ in range(3):
        g = torch.from_numpy(rng.standard_normal((4, 6)).astype(np.float32)).t()  # column-major (6, 4)
        opt.step({"0": g})
        t.grad = g.contiguous()
        ref.step()
    np.testing.assert_allclose(p.numpy(), t.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_as_torch_module_makes_the_parameters_row_major_for_fsdp2_with_the_same_values():
    net = lm.Sequential(lm.Linear(5, 4), lm.ReLU(), lm.Linear(4, 2))
    net(data()[0])  # built
    before = {k: p.numpy().copy() for k, p in net.named_parameters()}
    module = lm.as_torch_module(net)
    for k, t in module.named_parameters():
        assert t.is_contiguous() and t is net.get_parameter(k).value  # shared, row-major
        np.testing.assert_array_equal(t.detach().numpy(), before[k])
    assert net.get_parameter("0.weight").order == "C"
    net.get_parameter("0.weight").order = "F"  # and back: a new tensor with the same values
    assert column_major(net[0].weight)
    np.testing.assert_array_equal(net.get_parameter("0.weight").numpy(), before["0.weight"])


def test_changing_the_order_between_epochs_carries_the_optimizer_state_over():
    """A new memory order is a new tensor: the optimizer moves its state onto it, laid out as the new tensor
    (torch's fused Adam reads its moments as laid out like the parameter: a column-major moment carried onto
    a row-major weight would update wrong without a word)."""
    whole, _ = _twins()
    train(whole, lm.optim.Adam(whole, lr=0.01), 4)
    net, _ = _twins()
    opt = lm.optim.Adam(net, lr=0.01)
    train(net, opt, 2)
    for order in ("C", "F"):
        for p in net.parameters():
            if p.ndim == 2:
                p.order = order
        train(net, opt, 1)
    for k, p in whole.named_parameters():
        np.testing.assert_allclose(net.get_parameter(k).numpy(), p.numpy(), rtol=1e-6, atol=1e-7)


def test_a_gradient_set_by_hand_on_a_column_major_weight_gives_torch_optims_update():
    """``p.grad = row-major tensor`` then ``opt.step()``: the engine hands torch.optim the weight's memory (its
    transpose), and the gradient must come in that layout too (the fused Adam misreads it otherwise)."""
    lin = lm.Linear(12, 6)
    w0 = lin.get_parameter("weight").numpy().copy()
    assert column_major(lin.weight)
    t = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt, ref = lm.optim.Adam(lin, lr=0.1), torch.optim.Adam([t], lr=0.1, foreach=False)
    for seed in range(3):
        g = torch.from_numpy(np.random.default_rng(seed).standard_normal((12, 6)).astype(np.float32))
        lin.get_parameter("weight").grad = g.clone()  # row-major, unlike the weight
        lin.get_parameter("bias").grad = torch.zeros(6)
        opt.step()
        t.grad = g.clone()
        ref.step()
    np.testing.assert_allclose(lin.get_parameter("weight").numpy(), t.detach().numpy(), rtol=1e-6, atol=1e-6)
