"""Sharded checkpoints in one process: the Hugging Face index convention, a crash mid-save, the optimizer
state, loading on another backend. (Several processes: tests/test_distributed_torch.py and _jax.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

import lamina as lm
from lamina import sharded


def _net(backend):
    lm.set_backend(backend)
    lm.manual_seed(0)
    m = lm.Sequential(lm.Linear(8, 16), lm.ReLU(), lm.Linear(16, 1))
    m.build((2, 8))
    return m


def _numpy(m):
    b = lm.get_backend(m.backend)
    return {k: np.array(b.to_numpy(v.detach() if hasattr(v, "detach") else v)) for k, v in m.state_dict().items()}


def test_index_follows_the_hugging_face_convention_and_loads_elsewhere(tmp_path, backend):
    if backend == "numpy":
        pytest.skip("writes a trained model; numpy is checked as the loading side")
    m = _net(backend)
    want = _numpy(m)
    path = lm.distributed.save_sharded(m, tmp_path)
    spec = json.loads(open(path).read())
    assert path.endswith("model.safetensors.index.json")
    assert set(spec["weight_map"]) == set(want) and spec["metadata"]["world_size"] == 1
    from safetensors.numpy import load_file  # any safetensors reader opens a shard

    for key, f in spec["weight_map"].items():
        np.testing.assert_array_equal(load_file(tmp_path / f)[key], want[key])
    for other in ("numpy", "torch", "jax"):
        m2 = _net(other)
        lm.distributed.load_sharded(m2, tmp_path)
        got = _numpy(m2)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_a_crash_before_the_index_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    m = _net("torch")
    old = _numpy(m)
    lm.distributed.save_sharded(m, tmp_path)
    with lm.get_backend("torch").no_grad():
        for p in m.parameters():
            p.value.add_(1.0)

    real = sharded.os.replace

    def crash(src, dst, *a, **k):  # the shards are written, the index is not: a kill at the worst moment
        if str(dst).endswith(".index.json"):
            raise OSError("disk full")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(sharded.os, "replace", crash)
    with pytest.raises(OSError):
        lm.distributed.save_sharded(m, tmp_path)
    monkeypatch.undo()
    m2 = _net("torch")
    with lm.get_backend("torch").no_grad():
        for p in m2.parameters():
            p.value.zero_()
    lm.distributed.load_sharded(m2, tmp_path)
    got = _numpy(m2)
    for k in old:
        np.testing.assert_array_equal(got[k], old[k])
    # the next save that succeeds removes the shards no index names
    lm.distributed.save_sharded(m, tmp_path)
    spec = json.loads((tmp_path / sharded.INDEX).read_text())
    assert sorted(p.name for p in tmp_path.glob("model-*.safetensors")) == sorted(set(spec["weight_map"].values()))


def test_optimizer_state_round_trip(tmp_path):
    m = _net("torch")
    opt = lm.optim.Adam(m, lr=0.01)
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    lm.fit(m, lm.losses.mse, opt, (x, x[:, :1]), batch_size=16, progress=False)
    lm.distributed.save_sharded(m, tmp_path, optimizer=opt)
    m2 = _net("torch")
    opt2 = lm.optim.Adam(m2, lr=0.01)
    lm.distributed.load_sharded(m2, tmp_path, optimizer=opt2)
    assert opt2.steps == opt.steps == 4
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1:
        np.testing.assert_array_equal(np.asarray(s1[k]), np.asarray(s2[k]), err_msg=k)


def test_keys_are_spread_by_size():
    owner = sharded.assign({"a": 100, "b": 60, "c": 50, "d": 10}, 2)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 0}


def test_a_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(lm.CheckpointError, match="index"):
        lm.distributed.load_sharded(_net("torch"), tmp_path)
