"""Data-parallel training on torch.distributed: 2 processes on the gloo backend on CPU, launched as torchrun
would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), against a hand loop in plain torch in this process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

WORKER = textwrap.dedent(r'''
    import gc, json, os, sys, time
    import numpy as np
    import torch
    import lamina as lm
    from lamina import distributed as ld

    scenario, out = sys.argv[1], sys.argv[2]
    ld.initialize("gloo", timeout=float(os.environ.get("LM_TIMEOUT", "60")))
    rank = ld.rank()
    lm.set_backend("torch")
    torch.set_num_threads(1)

    def data():
        g = np.random.default_rng(1)
        x = g.normal(size=(256, 8)).astype("float32")
        y = (x[:, :1] * 2 - x[:, 1:2] + 0.1 * g.normal(size=(256, 1))).astype("float32")
        return x, y

    def net(width=16):
        lm.manual_seed(0)
        m = lm.Sequential(lm.Linear(8, width), lm.ReLU(), lm.Linear(width, 1))
        m.build((32, 8))
        return m

    def dump(name, model):
        np.savez(os.path.join(out, f"{name}-{rank}.npz"),
                 **{k: v.detach().numpy() for k, v in model.state_dict().items()})

    class SignSGD(lm.optim.Optimizer):  # its own rule, no torch.optim class: FSDP2 refuses it
        slots = ()

        def update(self, param, grad, state, scalars, xp):
            return param - scalars[0] * xp.sign(grad), {}

    x, y = data()
    if scenario == "fit":
        model = net()
        opt = lm.optim.SGD(model, lr=0.05)
        stop = lm.EarlyStopping(monitor="val_loss", patience=100)
        ckpt = lm.Checkpoint(os.path.join(out, "ckpt-{epoch}.safetensors"))
        h = lm.fit(model, lm.losses.mse, opt, (x, y), epochs=2, batch_size=32, validation_data=(x[:100], y[:100]),
                   callbacks=[stop, ckpt], progress=False)
        dump("fit", model)
        ld.save_sharded(model, os.path.join(out, "sharded"), optimizer=opt)
        json.dump(h.history, open(os.path.join(out, f"history-{rank}.json"), "w"))
        def own_loop(forward, opt, steps=range(4)):
            """A user's own loop: batch 32 per rank, this rank's rows of each global batch of 64."""
            for s in steps:
                sl = slice(s * 64 + rank * 32, s * 64 + rank * 32 + 32)
                ((forward(torch.from_numpy(x[sl])) - torch.from_numpy(y[sl])) ** 2).mean().backward()
                opt.step()
                opt.zero_grad()

        # a user's own loop: DDP over the adapter with torch.optim, and FSDP2 with torch.optim
        m2 = net()
        ddp = torch.nn.parallel.DistributedDataParallel(lm.as_torch_module(m2))
        own_loop(ddp, torch.optim.SGD(ddp.parameters(), lr=0.05))
        dump("ddp", m2)
        from torch.distributed.fsdp import fully_shard
        m3 = net()
        mod = lm.as_torch_module(m3)
        fully_shard(mod)
        own_loop(mod, torch.optim.SGD(mod.parameters(), lr=0.05))
        mod.gather_into_model()
        dump("fsdp", m3)
        # lm.fit with FSDP2 (shard_params=True), SGD with momentum: the momentum buffers are sharded with the
        # parameters, gathered for the Checkpoint at each epoch's end and sharded again for the next epoch
        m4 = net()
        opt4 = lm.optim.SGD(m4, lr=0.05, momentum=0.9)
        h4 = lm.fit(m4, lm.losses.mse, opt4, (x, y), epochs=2, batch_size=32, validation_data=(x[:100], y[:100]),
                    callbacks=[lm.Checkpoint(os.path.join(out, "fsdp-ckpt-{epoch}.safetensors"))], progress=False,
                    parallel=ld.DataParallel(shard_params=True))
        dump("fitfsdp", m4)
        json.dump(h4.history, open(os.path.join(out, f"history-fsdp-{rank}.json"), "w"))
        # a user's own loop with lm.optim: over DDP it steps the model's tensors, which DDP shares
        m5 = net()
        ddp5 = torch.nn.parallel.DistributedDataParallel(lm.as_torch_module(m5))
        own_loop(ddp5, lm.optim.SGD(m5, lr=0.05))
        dump("ddplm", m5)
        # ... over FSDP2 it steps the module's DTensor shards, its state sharded with them: SGD with momentum from
        # the first step; Adam after 2 steps under DDP, its full state distributed at the first sharded step
        for name, make, ddp_steps in (("fsdplm", lambda m: lm.optim.SGD(m, lr=0.05, momentum=0.9), 0),
                                      ("fsdpadam", lambda m: lm.optim.Adam(m, lr=0.01), 2)):
            m6 = net()
            opt6 = make(m6)
            own_loop(torch.nn.parallel.DistributedDataParallel(lm.as_torch_module(m6)), opt6, range(ddp_steps))
            wrapped = lm.as_torch_module(m6)
            fully_shard(wrapped)
            own_loop(wrapped, opt6, range(ddp_steps, 4))
            try:  # the state is sharded: gather_into_model first
                opt6.state_dict()
            except ValueError as e:
                open(os.path.join(out, f"{name}-early-{rank}.txt"), "w").write(str(e))
            wrapped.gather_into_model()
            lm.save(m6, os.path.join(out, f"{name}-{rank}.safetensors"), optimizer=opt6)  # each rank, to compare
        # an optimizer with its own rule cannot step the shards (DTensor cannot run it): a clear error; once the
        # sharded module is gone it steps the model's own tensors again
        m7 = net()
        mod7 = lm.as_torch_module(m7)
        fully_shard(mod7)
        sign = SignSGD(m7, lr=0.05)
        ((mod7(torch.from_numpy(x[:32])) - torch.from_numpy(y[:32])) ** 2).mean().backward()
        try:
            sign.step()
        except ValueError as e:
            open(os.path.join(out, f"own-loop-{rank}.txt"), "w").write(str(e))
        del mod7
        gc.collect()
        lm.losses.mse(m7(x[:32]), y[:32]).backward()
        before = m7.state_dict()["0.weight"].detach().clone()
        sign.step()
        assert not torch.equal(before, m7.state_dict()["0.weight"])
    elif scenario == "mismatch":
        model = net(16 if rank == 0 else 12)
        try:
            lm.fit(model, lm.losses.mse, lm.optim.SGD(model, lr=0.05), (x, y), batch_size=32, progress=False)
        except ld.DistributedError as e:
            open(os.path.join(out, f"error-{rank}.txt"), "w").write(str(e))
        model = net()
        try:
            lm.fit(model, lm.losses.mse, SignSGD(model, lr=0.05), (x, y), batch_size=32, progress=False,
                   parallel=ld.DataParallel(shard_params=True))
        except ld.DistributedError as e:
            open(os.path.join(out, f"own-rule-{rank}.txt"), "w").write(str(e))
    elif scenario == "uneven":
        model = net()
        n = 4 if rank == 0 else 2  # different batch counts: must not deadlock
        batches = ((x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(rank, 2 * n, 2))
        h = lm.fit(model, lm.losses.mse, lm.optim.SGD(model, lr=0.05), batches, progress=False)
        json.dump(h.history, open(os.path.join(out, f"history-{rank}.json"), "w"))
    elif scenario == "die":
        model = net()

        class Die(lm.Callback):
            def on_batch_end(self, batch, logs):
                if rank == 1 and batch == 2:
                    os._exit(3)

        t0 = time.time()
        try:
            lm.fit(model, lm.losses.mse, lm.optim.SGD(model, lr=0.05), (x, y), epochs=50, batch_size=4,
                   callbacks=[Die()], progress=False)
        except Exception as e:
            open(os.path.join(out, f"error-{rank}.txt"), "w").write(f"{time.time() - t0:.1f} {type(e).__name__}: {e}")
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, scenario, world=2, timeout_env="60", wait=60):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LM_TIMEOUT": timeout_env,
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), scenario, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    t0 = time.time()
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1, wait - (time.time() - t0)))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"{scenario}: the ranks did not finish within {wait}s (hang)") from None
    return [p.returncode for p in procs], outs


def _reference(epochs_steps, lr=0.05, momentum=0.0, adam=False):
    """1 process, batch 64, plain torch (no Lamina in the training): the same global batches. Returns the
    parameters, the data and, with ``momentum`` or ``adam`` (torch.optim.Adam with ``lr``), torch.optim's state
    as ``{"<path>/<slot>": array}``."""
    import lamina as lm

    lm.set_backend("torch")
    lm.manual_seed(0)
    init = lm.Sequential(lm.Linear(8, 16), lm.ReLU(), lm.Linear(16, 1))
    w = {k: v.detach().clone().requires_grad_(True) for k, v in init.state_dict().items()}
    g = np.random.default_rng(1)
    x = g.normal(size=(256, 8)).astype("float32")
    y = (x[:, :1] * 2 - x[:, 1:2] + 0.1 * g.normal(size=(256, 1))).astype("float32")
    opt = (torch.optim.Adam(list(w.values()), lr=lr) if adam
           else torch.optim.SGD(list(w.values()), lr=lr, momentum=momentum))
    rng = np.random.default_rng(0)
    for order in epochs_steps(rng):
        for s in range(0, 256, 64):
            idx = order[s:s + 64]
            xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
            out = torch.relu(xb @ w["0.weight"] + w["0.bias"]) @ w["2.weight"] + w["2.bias"]
            opt.zero_grad()
            ((out - yb) ** 2).mean().backward()
            opt.step()
    params = {k: v.detach().numpy() for k, v in w.items()}
    if momentum or adam:
        return params, x, y, {f"{k}/{slot}": torch.as_tensor(a).numpy() for k, v in w.items()
                              for slot, a in opt.state[v].items()}
    return params, x, y


def test_two_ranks_batch_32_equal_one_process_batch_64(tmp_path):
    rcs, outs = _launch(tmp_path, "fit")
    assert rcs == [0, 0], outs
    ref, x, y = _reference(lambda rng: [rng.permutation(256) for _ in range(2)])
    fixed, _, _ = _reference(lambda rng: [np.arange(256)] * 1)  # the user loops: 4 unshuffled steps of 64
    ref_fit = dict(np.load(tmp_path / "fit-0.npz"))
    for r in range(2):
        got = np.load(tmp_path / f"fit-{r}.npz")
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], atol=1e-6, err_msg=f"fit rank {r} {k}")
        for name in ("ddp", "fsdp", "ddplm"):  # user loops: DDP and FSDP2 with torch.optim, DDP with lm.optim
            got = np.load(tmp_path / f"{name}-{r}.npz")
            for k in fixed:
                np.testing.assert_allclose(got[k], fixed[k], atol=1e-6, err_msg=f"{name} rank {r} {k}")

    def val_loss(w):  # the mean over all 100 validation rows (each rank evaluated 50), by hand
        w = {k: torch.from_numpy(v) for k, v in w.items()}
        xb, yb = torch.from_numpy(x[:100]), torch.from_numpy(y[:100])
        out = torch.relu(xb @ w["0.weight"] + w["0.bias"]) @ w["2.weight"] + w["2.bias"]
        return float(((out - yb) ** 2).mean())

    h0, h1 = (json.loads((tmp_path / f"history-{r}.json").read_text()) for r in range(2))
    assert h0 == h1  # figures reduced over the ranks: every rank logs the same
    assert h0["val_loss"][-1] == pytest.approx(val_loss(ref_fit), rel=1e-5)
    # fit with FSDP2 and SGD with momentum == plain torch with momentum, on both ranks; the model was
    # gathered at each epoch's end (val_loss of the current values) and the Checkpoint has the momentum
    ref_m, _, _, state_m = _reference(lambda rng: [rng.permutation(256) for _ in range(2)], momentum=0.9)
    for r in range(2):
        got = np.load(tmp_path / f"fitfsdp-{r}.npz")
        for k in ref_m:
            np.testing.assert_allclose(got[k], ref_m[k], atol=1e-6, err_msg=f"fit FSDP2 rank {r} {k}")
    f0, f1 = (json.loads((tmp_path / f"history-fsdp-{r}.json").read_text()) for r in range(2))
    assert f0 == f1 and f0["val_loss"][-1] == pytest.approx(val_loss(ref_m), rel=1e-5)
    assert f0["val_loss"][0] != f0["val_loss"][1]
    import lamina as lm

    lm.set_backend("torch")
    m = lm.Sequential(lm.Linear(8, 16), lm.ReLU(), lm.Linear(16, 1))
    opt = lm.optim.SGD(m, lr=0.05, momentum=0.9)
    lm.load_into(m, tmp_path / "fsdp-ckpt-2.safetensors", optimizer=opt)
    state = opt.state_dict()
    for k in ref_m:
        np.testing.assert_allclose(m.state_dict()[k].detach().numpy(), ref_m[k], atol=1e-6, err_msg=k)
        np.testing.assert_allclose(state[f"{k}/momentum_buffer"].numpy(), state_m[f"{k}/momentum_buffer"],
                                   atol=1e-6, err_msg=k)
    # a user's loop over fully_shard with lm.optim steps the shards: after gather_into_model the model and the
    # state (momentum, Adam's moments and step) are those of plain torch, on both ranks; before it, state_dict
    # says to call it
    order = lambda rng: [np.arange(256)]  # noqa: E731 - the user loops: 4 unshuffled steps of 64
    for name, (ref_u, _, _, state_u) in (("fsdplm", _reference(order, momentum=0.9)),
                                         ("fsdpadam", _reference(order, lr=0.01, adam=True))):
        for r in range(2):
            m = lm.Sequential(lm.Linear(8, 16), lm.ReLU(), lm.Linear(16, 1))
            opt = lm.optim.SGD(m, lr=0.05, momentum=0.9) if name == "fsdplm" else lm.optim.Adam(m, lr=0.01)
            lm.load_into(m, tmp_path / f"{name}-{r}.safetensors", optimizer=opt)
            got = {k: v.detach().numpy() for k, v in m.state_dict().items()}
            for k in ref_u:
                np.testing.assert_allclose(got[k], ref_u[k], atol=1e-6, err_msg=f"{name} rank {r} {k}")
            got = {k: v.numpy() for k, v in opt.state_dict().items()}
            assert opt.steps == 4 and set(state_u) <= set(got), (opt.steps, sorted(got))
            for k in state_u:
                np.testing.assert_allclose(got[k], state_u[k], atol=1e-6, err_msg=f"{name} rank {r} {k}")
            msg = (tmp_path / f"{name}-early-{r}.txt").read_text()
            assert "sharded" in msg and "call module.gather_into_model() on every rank first" in msg, msg
    for r in range(2):  # ... but not an optimizer with its own update rule
        msg = (tmp_path / f"own-loop-{r}.txt").read_text()
        assert "SignSGD.step(): parameter '0.weight' is trained as FSDP2 shards" in msg and "torch_class" in msg, msg
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.safetensors")) == ["ckpt-1.safetensors", "ckpt-2.safetensors"]
    # the sharded checkpoint of 2 ranks: 2 shards + the index, loads into 1 process (here, on jax too)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2 and index["metadata"]["world_size"] == 2
    for backend in ("torch", "jax"):
        lm.set_backend(backend)
        m = lm.Sequential(lm.Linear(8, 16), lm.ReLU(), lm.Linear(16, 1))
        opt = lm.optim.SGD(m, lr=0.05)
        lm.distributed.load_sharded(m, tmp_path / "sharded", optimizer=opt)
        for k, v in m.state_dict().items():
            np.testing.assert_array_equal(lm.get_backend(backend).to_numpy(v), ref_fit[k], err_msg=k)
        assert opt.steps == 8


def test_models_that_differ_are_named_at_the_start(tmp_path):
    rcs, outs = _launch(tmp_path, "mismatch")
    assert rcs == [0, 0], outs
    for r in range(2):
        msg = (tmp_path / f"error-{r}.txt").read_text()
        assert "'0.weight'" in msg and "(8, 16)" in msg and "(8, 12)" in msg, msg
        msg = (tmp_path / f"own-rule-{r}.txt").read_text()  # FSDP2 in fit needs a torch.optim class
        assert "SignSGD has none" in msg and "shard_params=False" in msg, msg


def test_different_batch_counts_do_not_deadlock(tmp_path):
    rcs, outs = _launch(tmp_path, "uneven", wait=40)
    assert rcs == [0, 0], outs
    h0, h1 = (json.loads((tmp_path / f"history-{r}.json").read_text()) for r in range(2))
    assert h0 == h1


def test_a_dead_rank_stops_the_others_with_an_error(tmp_path):
    rcs, outs = _launch(tmp_path, "die", timeout_env="10", wait=45)
    assert rcs[1] == 3
    text = (tmp_path / "error-0.txt").read_text()
    seconds = float(text.split()[0])
    assert seconds < 30, text
    assert "DistributedError" in text and "another rank" in text, text
