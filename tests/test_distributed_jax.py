"""Data-parallel and FSDP-style training on jax over 4 forced host devices (in a subprocess, since the device
count is fixed when jax starts), against a hand loop in plain jax on one device."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")

SCRIPT = textwrap.dedent(r'''
    import os, sys
    import numpy as np
    import jax, jax.numpy as jnp
    import lamina as lm
    assert len(jax.devices()) == 4, jax.devices()
    lm.set_backend("jax")
    g = np.random.default_rng(1)
    x = g.normal(size=(256, 8)).astype("float32")
    y = (x[:, :1] * 2 - x[:, 1:2]).astype("float32")

    def net():
        lm.manual_seed(0)
        return lm.Sequential(lm.Linear(8, 16), lm.ReLU(), lm.Linear(16, 4), lm.ReLU(), lm.Linear(4, 1))

    # the reference: plain jax, one device, SGD over the same shuffled batches of 64
    w = {k: jnp.asarray(np.asarray(v)) for k, v in net().state_dict().items()}
    def loss(w, xb, yb):
        h = jax.nn.relu(xb @ w["0.weight"] + w["0.bias"])
        h = jax.nn.relu(h @ w["2.weight"] + w["2.bias"])
        return jnp.mean((h @ w["4.weight"] + w["4.bias"] - yb) ** 2)
    grad = jax.jit(jax.grad(loss))
    rng = np.random.default_rng(0)
    for _ in range(2):
        order = rng.permutation(256)
        for s in range(0, 256, 64):
            gr = grad(w, x[order[s:s + 64]], y[order[s:s + 64]])
            w = {k: w[k] - 0.05 * gr[k] for k in w}
    ref = {k: np.asarray(v) for k, v in w.items()}

    for par in (None, lm.distributed.DataParallel(devices=4),
                lm.distributed.DataParallel(devices=4, shard_params=True), lm.distributed.DataParallel(devices=2)):
        m = net()
        opt = lm.optim.SGD(m, lr=0.05)
        h = lm.fit(m, lm.losses.mse, opt, (x, y), epochs=2, batch_size=64, parallel=par, progress=False,
                   validation_data=(x[:50], y[:50]))
        for k, v in m.state_dict().items():
            np.testing.assert_allclose(np.asarray(v), ref[k], atol=2e-6, err_msg=f"{par} {k}")
        if par is not None:
            s = m.state_dict()["0.weight"].sharding
            assert len(s.device_set) == par.devices, s
            assert (s.spec == jax.sharding.PartitionSpec("data")) == par.shard_params, s.spec
        if par is not None and par.shard_params:  # a sharded checkpoint of a sharded model loads anywhere
            out = sys.argv[1]
            lm.distributed.save_sharded(m, out, optimizer=opt)
            m2 = net()
            lm.distributed.load_sharded(m2, out)
            for k, v in m2.state_dict().items():
                np.testing.assert_array_equal(np.asarray(v), np.asarray(m.state_dict()[k]))
            lm.set_backend("numpy")
            m3 = net()
            lm.distributed.load_sharded(m3, out)
            lm.set_backend("jax")
            m4 = net()
            opt4 = lm.optim.SGD(m4, lr=0.05)
            lm.distributed.load_sharded(m4, out, optimizer=opt4)  # onto 2 devices, then train on
            lm.fit(m4, lm.losses.mse, opt4, (x, y), batch_size=64, progress=False,
                   parallel=lm.distributed.DataParallel(devices=2, shard_params=True))
    # a batch that does not split evenly over the devices (256 rows, batch 48: last batch 16 rows) still trains
    m = net()
    lm.fit(m, lm.losses.mse, lm.optim.SGD(m, lr=0.05), (x[:250], y[:250]), batch_size=48, progress=False,
           parallel=lm.distributed.DataParallel(devices=4))
    try:
        lm.distributed.DataParallel(devices=0)
    except ValueError:
        pass
    else:
        raise AssertionError("devices=0 accepted")
    try:
        m = net()
        lm.fit(m, lm.losses.mse, lm.optim.SGD(m), (x, y), parallel=lm.distributed.DataParallel(devices=8),
               progress=False)
    except lm.distributed.DistributedError as e:
        assert "xla_force_host_platform_device_count" in str(e), e
    else:
        raise AssertionError("8 devices of 4 accepted")
    print("OK")
''')


def test_four_devices_equal_one_with_and_without_parameter_sharding(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
