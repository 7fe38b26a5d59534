"""BatchNorm (buffers updated in training mode) and Dropout (random keys), eagerly and in compiled steps."""

import numpy as np
import pytest

import lamina as lm

from conftest import BACKENDS, GRAD_BACKENDS, to_np

torch = pytest.importorskip("torch", reason="the references are torch.nn layers")


def batches(shape, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * 2 + i).astype(np.float32) for i in range(n)]


@pytest.mark.parametrize(("make", "make_ref", "shape"), [
    (lambda: lm.BatchNorm1d(), lambda: torch.nn.BatchNorm1d(3), (6, 3)),
    (lambda: lm.BatchNorm1d(momentum=0.3), lambda: torch.nn.BatchNorm1d(3, momentum=0.3), (6, 3, 5)),
    (lambda: lm.BatchNorm2d(eps=1e-3), lambda: torch.nn.BatchNorm2d(3, eps=1e-3), (4, 3, 5, 4)),
], ids=["1d", "1d-seq", "2d"])
def test_batchnorm_matches_torch_in_train_and_eval_mode(backend, make, make_ref, shape):
    bn, ref = make(), make_ref()
    for x in batches(shape):
        np.testing.assert_allclose(to_np(bn(x)), ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(to_np(getattr(bn, name)), getattr(ref, name).numpy(), rtol=1e-5, atol=1e-6)
    assert int(to_np(bn.num_batches_tracked)) == int(ref.num_batches_tracked) == 4
    bn.eval(), ref.eval()
    x = batches(shape, 1, seed=9)[0]
    np.testing.assert_allclose(to_np(bn(x)), ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_batchnorm_gradients_and_running_stats_under_value_and_grad(grad_backend):
    bn, ref = lm.BatchNorm2d(), torch.nn.BatchNorm2d(3)
    x = batches((4, 3, 3, 3), 1)[0]
    r = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    b = lm.get_backend()
    _, grads = lm.value_and_grad(lambda m, v: (m(v) * b.from_numpy(r)).sum())(bn, x)
    (ref(torch.from_numpy(x)) * torch.from_numpy(r)).sum().backward()
    np.testing.assert_allclose(to_np(grads["weight"]), ref.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_np(grads["bias"]), ref.bias.grad.numpy(), rtol=1e-4, atol=1e-5)
    # the forward inside value_and_grad updated the running statistics, as an eager call does
    np.testing.assert_allclose(to_np(bn.running_var), ref.running_var.numpy(), rtol=1e-5)
    assert lm.backend_of(bn.running_mean).name == grad_backend


def test_functional_call_returns_buffer_updates_and_leaves_the_model_alone(backend):
    bn = lm.BatchNorm1d()
    x = batches((5, 2), 1)[0]
    bn.build(x.shape)
    before = to_np(bn.running_mean).copy()
    out, new = lm.functional_call(bn, {}, x, return_buffers=True)
    assert set(new) == {"running_mean", "running_var", "num_batches_tracked"}
    np.testing.assert_allclose(to_np(new["running_mean"]), 0.1 * x.mean(0), rtol=1e-5)
    np.testing.assert_array_equal(to_np(bn.running_mean), before)


@pytest.mark.parametrize("steps_per_call", [1, 16])
def test_running_statistics_are_updated_inside_the_compiled_train_step(grad_backend, steps_per_call):
    lm.manual_seed(0)
    net = lm.Sequential(lm.Conv2d(4, 3, padding=1), lm.BatchNorm2d(), lm.ReLU(), lm.GlobalAvgPool(), lm.Linear(2))
    xs = batches((8, 3, 5, 5), 16, seed=3)
    ys = [np.zeros(8, np.int64) for _ in xs]
    net.build((8, 3, 5, 5))
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    conv.weight.data = torch.from_numpy(net[0].get_parameter("weight").numpy().copy())
    conv.bias.data = torch.from_numpy(net[0].get_parameter("bias").numpy().copy())
    ref = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        for x in xs:
            ref(conv(torch.from_numpy(x)))
    # lr=0: the weights stay as they are, so only the running statistics move, batch after batch
    lm.fit(net, lm.losses.cross_entropy, lm.optim.SGD(net, lr=0.0), list(zip(xs, ys)), epochs=1,
           steps_per_call=steps_per_call, progress=False)
    np.testing.assert_allclose(to_np(net[1].running_mean), ref.running_mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_np(net[1].running_var), ref.running_var.numpy(), rtol=1e-4, atol=1e-5)
    assert int(to_np(net[1].num_batches_tracked)) == 16


def test_dropout_semantics_and_reproducibility(backend):
    x = np.ones((400, 50), np.float32)
    drop = lm.Dropout(0.3)
    lm.manual_seed(5)
    a = to_np(drop(x))
    kept = a != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(a[kept], 1 / 0.7, rtol=1e-6)
    b = to_np(drop(x))
    assert not np.array_equal(a, b)  # a new mask each call
    lm.manual_seed(5)
    np.testing.assert_array_equal(to_np(drop(x)), a)  # same seed, same masks
    drop.eval()
    np.testing.assert_array_equal(to_np(drop(x)), x)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
        lm.Dropout(1.0)


def dropout_losses(seed):
    lm.manual_seed(seed)
    net = lm.Sequential(lm.Dropout(0.5), lm.Linear(8, 1))
    x = np.ones((16, 8), np.float32)
    data = [(x, np.zeros((16, 1), np.float32))] * 20

    class Record(lm.Callback):
        losses = []

        def on_batch_end(self, batch, logs):
            self.losses.append(logs["loss"])

    record = Record()
    record.losses = []
    lm.fit(net, lm.losses.mse, lm.optim.SGD(net, lr=0.0), data, epochs=1, callbacks=[record], progress=False)
    return record.losses


@pytest.mark.skipif(not GRAD_BACKENDS, reason="needs a backend that trains")
def test_dropout_in_train_steps_gets_a_new_mask_each_step_reproducibly(grad_backend):
    first, again, other = dropout_losses(1), dropout_losses(1), dropout_losses(2)
    assert len(set(np.round(first, 6))) > 10  # same weights (lr=0), different masks: different losses
    assert first == again
    assert first != other


@pytest.mark.parametrize("make,shape", [(lambda: lm.BatchNorm1d(), (4, 3)), (lambda: lm.BatchNorm2d(), (2, 3, 4, 4)),
                                        (lambda: lm.Dropout(0.2), (3, 5))], ids=["bn1d", "bn2d", "dropout"])
def test_check_layer_passes(backend, make, shape):
    lm.testing.check_layer(make(), shape, output_shape=shape)


@pytest.mark.parametrize("src", BACKENDS)
@pytest.mark.parametrize("dst", BACKENDS)
def test_batchnorm_checkpoints_cross_backends(src, dst, tmp_path):
    lm.set_backend(src)
    net = lm.Sequential(lm.Conv2d(3, 3), lm.BatchNorm2d(), lm.Flatten())
    for x in batches((4, 2, 5, 5), 2):
        net(x)
    net.eval()
    x = batches((2, 2, 5, 5), 1, seed=7)[0]
    y = to_np(net(x))
    lm.save(net, tmp_path / "bn.safetensors")
    lm.set_backend(dst)
    clone = lm.Sequential(lm.Conv2d(3, 3), lm.BatchNorm2d(), lm.Flatten())
    lm.load_into(clone, tmp_path / "bn.safetensors")
    np.testing.assert_allclose(to_np(clone.eval()(x)), y, rtol=1e-5, atol=1e-5)
    assert int(to_np(clone[1].num_batches_tracked)) == 2


def test_a_tracer_is_never_stored_in_a_buffer():
    if "jax" not in BACKENDS:
        pytest.skip("jax not installed")
    import jax

    lm.set_backend("jax")
    bn = lm.BatchNorm1d()
    x = batches((4, 3), 1)[0]
    bn(x)
    with pytest.raises(lm.ModuleError, match="traced value.*lm.functional_call"):
        jax.jit(lambda v: bn(v))(x)  # training mode: forward assigns the running statistics
    assert type(bn.running_mean).__name__ == "ArrayImpl"
    params = bn.state_dict()
    out, new = jax.jit(lambda p, v: lm.functional_call(bn, p, v, return_buffers=True))(params, x)
    assert set(new) == {"running_mean", "running_var", "num_batches_tracked"}
