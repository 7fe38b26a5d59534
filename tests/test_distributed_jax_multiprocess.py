"""Two jax processes on this CPU machine (``jax.distributed.initialize`` on localhost; jax's CPU collectives
run over gloo), against a hand loop in plain jax in this process: ``lm.fit`` with ``DataParallel`` over the
2 processes (``batch_size`` per process) equals 1 process with the global batch, with replicated and with
sharded parameters; models that differ are named at the start; a sharded checkpoint written by the 2
processes loads into 1."""

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

pytest.importorskip("jax")

WORKER = textwrap.dedent(r'''
    import json, os, sys
    import jax

    r, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default since jax 0.5.1, said here
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=r,
                               initialization_timeout=30)
    import numpy as np
    import lamina as lm
    from lamina import distributed as ld, process_group
    from lamina.training.jax_dist import full_value

    lm.set_backend("jax")
    report = {"group": [ld.rank(), ld.world_size(), process_group.broadcast(["from", r]),
                        process_group.all_gather({"rank": r, "pad": "x" * (5 * r)})]}
    ld.barrier()
    g = np.random.default_rng(1)
    x = g.normal(size=(256, 8)).astype("float32")
    y = (x[:, :1] * 2 - x[:, 1:2]).astype("float32")

    def net(width=16):
        lm.manual_seed(0)
        return lm.Sequential(lm.Linear(8, width), lm.ReLU(), lm.Linear(width, 4), lm.ReLU(), lm.Linear(4, 1))

    def dump(name, model):
        np.savez(os.path.join(out, f"{name}-{r}.npz"),
                 **{k: np.asarray(full_value(v)) for k, v in model.state_dict().items()})

    # (a) replicated parameters, SGD: batch 32 in each process == batch 64 in one
    m = net()
    h = lm.fit(m, lm.losses.mse, lm.optim.SGD(m, lr=0.05), (x, y), epochs=2, batch_size=32, progress=False,
               parallel=ld.DataParallel(), validation_data=(x[:100], y[:100]))
    dump("replicated", m)
    report["history"] = h.history
    # ... parameters and momentum sharded over the 2 processes' devices, then a sharded checkpoint (c)
    m = net()
    opt = lm.optim.SGD(m, lr=0.05, momentum=0.9)
    lm.fit(m, lm.losses.mse, opt, (x, y), epochs=2, batch_size=32, progress=False,
           parallel=ld.DataParallel(shard_params=True))
    w = m.state_dict()["0.weight"]
    report["sharded"] = [str(w.sharding.spec), w.is_fully_addressable, len(w.sharding.device_set)]
    dump("sharded", m)
    ld.save_sharded(m, os.path.join(out, "ckpt"), optimizer=opt)
    json.dump(report, open(os.path.join(out, f"report-{r}.json"), "w"))
    # (b) models that differ: both processes name the difference before any step (unchecked, they hang)
    m = net(16 if r == 0 else 12)
    try:
        lm.fit(m, lm.losses.mse, lm.optim.SGD(m, lr=0.05), (x, y), batch_size=32, progress=False,
               parallel=ld.DataParallel())
    except ld.DistributedError as e:
        open(os.path.join(out, f"mismatch-{r}.txt"), "w").write(str(e))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Both processes, once for the tests of this file: ``(folder, their output)``. Processes that do not
    finish within the timeout (a hang) are killed; each test then fails on what is missing."""
    out = tmp_path_factory.mktemp("jax2")
    script = out / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("XLA_FLAGS", None)  # one device per process
    port = str(_free_port())
    logs = [open(out / f"log-{r}.txt", "w") for r in range(2)]  # files, not pipes: a full pipe would block
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, str(out)], env=env, stdout=logs[r],
                              stderr=subprocess.STDOUT) for r in range(2)]
    deadline = time.time() + TIMEOUT
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
    for f in logs:
        f.close()
    text = "\n\n".join(f"process {r} (exit {p.wait()}):\n{(out / f'log-{r}.txt').read_text()[-3000:]}"
                         for r, p in enumerate(procs))
    return out, text


TIMEOUT = 60  # seconds for both processes (about 10 s on a free 2-core machine)


def _reports(run):
    out, text = run
    try:
        return [json.loads((out / f"report-{r}.json").read_text()) for r in range(2)]
    except FileNotFoundError:
        pytest.fail(f"a jax process stopped (or hung, killed after {TIMEOUT} s) before its report:\n{text}")


def _data():
    """The workers' data (the same lines as in WORKER)."""
    g = np.random.default_rng(1)
    x = g.normal(size=(256, 8)).astype("float32")
    return x, (x[:, :1] * 2 - x[:, 1:2]).astype("float32")


def _reference(momentum=0.0):
    """1 process, the global batch of 64, plain jax: SGD (with ``momentum``, torch's rule) over the same
    shuffled orders. Returns the parameters and the momentum buffers."""
    import jax
    import jax.numpy as jnp

    import lamina as lm

    lm.set_backend("jax")
    lm.manual_seed(0)
    init = lm.Sequential(lm.Linear(8, 16), lm.ReLU(), lm.Linear(16, 4), lm.ReLU(), lm.Linear(4, 1))
    w = {k: jnp.asarray(np.asarray(v)) for k, v in init.state_dict().items()}
    x, y = _data()

    def loss(w, xb, yb):
        h = jax.nn.relu(xb @ w["0.weight"] + w["0.bias"])
        h = jax.nn.relu(h @ w["2.weight"] + w["2.bias"])
        return jnp.mean((h @ w["4.weight"] + w["4.bias"] - yb) ** 2)

    grad = jax.jit(jax.grad(loss))
    buf = None
    rng = np.random.default_rng(0)
    for _ in range(2):
        order = rng.permutation(256)
        for s in range(0, 256, 64):
            gr = grad(w, x[order[s:s + 64]], y[order[s:s + 64]])
            buf = gr if buf is None else {k: momentum * buf[k] + gr[k] for k in w}
            step = buf if momentum else gr
            w = {k: w[k] - 0.05 * step[k] for k in w}
    return {k: np.asarray(v) for k, v in w.items()}, {k: np.asarray(v) for k, v in buf.items()}


def test_the_group_sends_python_objects(run):
    reports = _reports(run)
    for r, rep in enumerate(reports):
        rank, world, sent, gathered = rep["group"]
        assert (rank, world) == (r, 2)
        assert sent == ["from", 0]  # process 0's, on both
        assert gathered == [{"rank": 0, "pad": ""}, {"rank": 1, "pad": "xxxxx"}]  # different lengths, padded


def test_two_processes_batch_32_equal_one_process_batch_64(run):
    import jax

    out, reports = run[0], _reports(run)
    ref, _ = _reference()
    ref_m, _ = _reference(momentum=0.9)
    for r in range(2):
        for name, expected in (("replicated", ref), ("sharded", ref_m)):
            got = np.load(out / f"{name}-{r}.npz")
            for k in expected:
                np.testing.assert_allclose(got[k], expected[k], atol=2e-6, err_msg=f"{name} process {r} {k}")
    h = reports[0]["history"]
    assert h == reports[1]["history"]  # the epoch's figures, summed over both processes
    # val_loss over all 100 validation rows (each process evaluated 50) == the mean over the whole set, by hand
    x, y = _data()
    hidden = np.maximum(np.maximum(x[:100] @ ref["0.weight"] + ref["0.bias"], 0) @ ref["2.weight"] + ref["2.bias"], 0)
    assert h["val_loss"][-1] == pytest.approx(float(np.mean((hidden @ ref["4.weight"] + ref["4.bias"] - y[:100]) ** 2)),
                                              rel=1e-5)
    # with shard_params, 0.weight (8, 16) is split over the 2 processes' devices: neither holds all of it
    assert reports[0]["sharded"] == [str(jax.sharding.PartitionSpec("data")), False, 2]


def test_models_that_differ_are_named_at_the_start(run):
    out, text = run
    for r in range(2):
        assert (out / f"mismatch-{r}.txt").exists(), f"process {r} raised no DistributedError:\n{text}"
        msg = (out / f"mismatch-{r}.txt").read_text()
        assert "'0.weight'" in msg and "(8, 16)" in msg and "(8, 12)" in msg, msg


def test_a_sharded_checkpoint_of_two_processes_loads_into_one(run):
    out = run[0]
    _reports(run)  # both processes got past the save
    import lamina as lm

    index = json.loads((out / "ckpt" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2 and index["metadata"]["world_size"] == 2
    ref_m, bufs = _reference(momentum=0.9)
    written = np.load(out / "sharded-0.npz")
    lm.set_backend("jax")
    m = lm.Sequential(lm.Linear(8, 16), lm.ReLU(), lm.Linear(16, 4), lm.ReLU(), lm.Linear(4, 1))
    opt = lm.optim.SGD(m, lr=0.05, momentum=0.9)
    lm.distributed.load_sharded(m, out / "ckpt", optimizer=opt)
    state = opt.state_dict()
    assert opt.steps == 8
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(np.asarray(v), written[k], err_msg=k)
        np.testing.assert_allclose(np.asarray(state[f"{k}/momentum_buffer"]), bufs[k], atol=2e-6, err_msg=k)


# ----- faults: a process that dies or stalls mid-fit ---------------------------------------------------------
FAULT_WORKER = textwrap.dedent(r"""
    import os, sys, time
    import lamina as lm
    from lamina import distributed as ld

    r, port, out, scenario, timeout = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
    ld.initialize("gloo", timeout=timeout, framework="jax", coordinator_address=f"127.0.0.1:{port}",
                  num_processes=2, process_id=r, initialization_timeout=60)  # a slow start is no fault here
    import numpy as np

    lm.set_backend("jax")
    x = np.random.default_rng(1).normal(size=(256, 8)).astype("float32")
    lm.manual_seed(0)
    model = lm.Sequential(lm.Linear(8, 16), lm.ReLU(), lm.Linear(16, 1))
    faulty = 0 if scenario == "coordinator-dies" else 1

    class Fault(lm.Callback):
        def on_batch_end(self, batch, logs):
            if r == faulty and batch == 2:
                open(os.path.join(out, "fault.txt"), "w").write(repr(time.time()))
                if scenario == "stalls":
                    time.sleep(timeout + 5)  # alive (jax's heartbeats go on), but in no collective
                else:
                    os._exit(3)

    try:
        lm.fit(model, lm.losses.mse, lm.optim.SGD(model, lr=0.05), (x, x[:, :1]), epochs=50, batch_size=4,
               callbacks=[Fault()], progress=False, parallel=ld.DataParallel())
    except Exception as e:
        open(os.path.join(out, f"error-{r}.txt"), "w").write(f"{time.time()!r} {type(e).__name__}: {e}")
        raise
""")

FAULT_TIMEOUT = 10  # lm.distributed.initialize(timeout=...) in the fault workers, seconds
FAULT_WAIT = 40  # seconds for all three pairs (about 12 s on a free 2-core machine): beyond, a hang fails


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """The three fault scenarios, each a pair of processes, run at once: ``{scenario: (folder, exit codes,
    exit times, output)}``. Processes still running at ``FAULT_WAIT`` are killed (exit code None)."""
    root = tmp_path_factory.mktemp("jax2-faults")
    script = root / "worker.py"
    script.write_text(FAULT_WORKER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("XLA_FLAGS", None)
    runs = {}
    for scenario in ("dies", "coordinator-dies", "stalls"):
        out = root / scenario
        out.mkdir()
        port = str(_free_port())
        logs = [open(out / f"log-{r}.txt", "w") for r in range(2)]
        procs = [subprocess.Popen([sys.executable, str(script), str(r), port, str(out), scenario,
                                   str(FAULT_TIMEOUT)], env=env, stdout=logs[r], stderr=subprocess.STDOUT)
                 for r in range(2)]
        runs[scenario] = (out, procs, logs, [None, None])
    deadline = time.time() + FAULT_WAIT
    while time.time() < deadline and any(p.poll() is None for _, procs, _, _ in runs.values() for p in procs):
        for _, procs, _, ended in runs.values():
            for r, p in enumerate(procs):
                if ended[r] is None and p.poll() is not None:
                    ended[r] = time.time()
        time.sleep(0.05)
    result = {}
    for scenario, (out, procs, logs, ended) in runs.items():
        for r, p in enumerate(procs):
            if ended[r] is None and p.poll() is not None:
                ended[r] = time.time()
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
        codes = [p.returncode if t is not None else None for p, t in zip(procs, ended)]
        text = "\n\n".join(f"process {r} (exit {codes[r]}):\n{(out / f'log-{r}.txt').read_text()[-3000:]}"
                           for r in range(2))
        result[scenario] = (out, codes, ended, text)
    return result


def _fault_time(out, text) -> float:
    assert (out / "fault.txt").exists(), f"no process reached the fault:\n{text}"
    return float((out / "fault.txt").read_text())


def _error(out, r, text):
    """``(time, message)`` of process ``r``'s error in ``fit``."""
    assert (out / f"error-{r}.txt").exists(), f"process {r} raised nothing from fit:\n{text}"
    when, msg = (out / f"error-{r}.txt").read_text().split(" ", 1)
    return float(when), msg


def test_a_dead_process_stops_the_other_with_an_error(faults):
    out, codes, ended, text = faults["dies"]
    died = _fault_time(out, text)
    assert codes[1] == 3, text
    when, msg = _error(out, 0, text)
    assert msg.startswith("DistributedError: jax process 0: a train step failed because another jax process "
                          "stopped answering"), msg
    assert "start every process again" in msg and "Gloo" in msg, msg  # what to do; jax's own words
    assert when - died < FAULT_TIMEOUT, (when - died, text)  # gloo sees the closed connection at once
    # ... then exits with status 1 at once, not after jax's shutdown waited out the heartbeat timeout and
    # aborted (status 134)
    assert codes[0] == 1, text
    assert ended[0] - died < FAULT_TIMEOUT, (ended[0] - died, text)


def test_a_dead_coordinator_stops_the_other_within_the_timeout(faults):
    """Process 0 runs jax's coordination service: when it dies, jax ends the other process itself (a fatal
    error, status 134, naming the dead task), unless Lamina's error came first (status 1)."""
    out, codes, ended, text = faults["coordinator-dies"]
    died = _fault_time(out, text)
    assert codes[0] == 3, text
    assert codes[1] in (1, -6, 134), text  # -6: SIGABRT, as subprocess reports it
    log = (out / "log-1.txt").read_text()
    assert "DistributedError: jax process 1" in log or "another task died" in log, text
    assert ended[1] - died < FAULT_TIMEOUT, (ended[1] - died, text)


def test_a_stalled_process_stops_the_other_after_the_timeout(faults):
    """Alive but in no collective (jax's heartbeats go on): the other's collective fails after the timeout
    that ``lm.distributed.initialize`` set (``--xla_cpu_collective_timeout_seconds``), not before."""
    out, codes, ended, text = faults["stalls"]
    stalled = _fault_time(out, text)
    when, msg = _error(out, 0, text)
    assert msg.startswith("DistributedError: jax process 0: a train step failed because another jax process "
                          "stopped answering"), msg
    assert FAULT_TIMEOUT - 1 < when - stalled < FAULT_TIMEOUT + 5, (when - stalled, text)
    assert codes[0] == 1, text


def test_only_a_failed_collective_becomes_a_distributed_error(monkeypatch):
    """What the workers above cannot show: jax's errors of this process alone go through unchanged."""
    from lamina.distributed import DistributedError
    from lamina.training import jax_dist

    monkeypatch.setattr(jax_dist, "_failed", [False])  # this process must not exit with status 1 afterwards
    for own in (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8 bytes"),
                ValueError("UNKNOWN: a custom call failed"), ValueError("Incompatible shapes: (3,) vs (4,)")):
        with pytest.raises(type(own)) as info, jax_dist.collective("a step"):
            raise own
        assert info.value is own
    assert jax_dist._failed == [False]
    with pytest.raises(DistributedError, match="a step failed because another jax process stopped answering"):
        with jax_dist.collective("a step"):
            raise RuntimeError("UNKNOWN: Gloo all-reduce failed: [pair.cc:547] Connection closed by peer")
    assert jax_dist._failed == [True]
