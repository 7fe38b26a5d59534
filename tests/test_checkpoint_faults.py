"""Checkpoints under faults and races: kill -9 during saves, a reader racing a writer, threads saving to one
path. File handling is backend-neutral (the arrays are NumPy ones), so these run once, on NumPy arrays.

``LAMINA_FUZZ_EXAMPLES`` (default 30) scales the number of kills and racing rounds: e.g.
``LAMINA_FUZZ_EXAMPLES=5000 pytest tests/test_checkpoint_faults.py tests/test_fuzz.py``.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import lamina as lm

ROUNDS = int(os.environ.get("LAMINA_FUZZ_EXAMPLES", "30"))
N = 200_000  # floats per checkpoint: big enough that a save takes a while, small enough to be quick


def version(i: int) -> dict:
    """Checkpoint number ``i``: every value says which checkpoint it belongs to, so a mix shows."""
    return {"a": np.full(N, i, np.float32), "b": np.full(N // 2, i, np.int64), "c": np.full(7, i, np.float64)}


def whole_version(d: dict) -> int:
    """The one checkpoint ``d`` is, or an AssertionError if it mixes two or is damaged."""
    i = int(d["c"][0])
    for k, v in version(i).items():
        np.testing.assert_array_equal(np.asarray(d[k]), v, err_msg=f"{k} is not from checkpoint {i}")
    return i


SAVER = """
import sys, numpy as np, lamina as lm
path, start = sys.argv[1], int(sys.argv[2])
N = __N__
i = start
print("ready", flush=True)
while True:
    lm.save({"a": np.full(N, i, np.float32), "b": np.full(N // 2, i, np.int64), "c": np.full(7, i, np.float64)},
            path, durable=False)
    i += 1
""".replace("__N__", str(N))


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and pid checks are POSIX")
def test_kill_9_during_saves_leaves_a_whole_checkpoint_and_the_next_save_cleans_up(tmp_path):
    path = tmp_path / "latest.st"
    lm.save(version(0), path)
    rng = np.random.default_rng(0)
    rounds, last = max(3, ROUNDS // 6), 0
    for r in range(rounds):
        p = subprocess.Popen([sys.executable, "-c", SAVER, str(path), str(r * 1000 + 1)], stdout=subprocess.PIPE)
        assert p.stdout.readline().strip() == b"ready"
        time.sleep(float(rng.uniform(0.0, 0.15)))
        p.send_signal(signal.SIGKILL)
        p.wait()
        got = whole_version(lm.load(path, backend="numpy"))  # the old file or one of the new ones, whole
        assert got == last or r * 1000 < got < r * 1000 + 100_000, (got, last)
        last = got
    leftovers = [f for f in os.listdir(tmp_path) if f != "latest.st"]
    assert all(".lamina-tmp-" in f for f in leftovers), leftovers  # a killed save's temporary file, named so
    lm.save(version(7), path)  # the next save removes the temporary files of the dead savers
    assert os.listdir(tmp_path) == ["latest.st"]
    assert whole_version(lm.load(path, backend="numpy")) == 7


def test_a_reader_racing_a_writer_always_gets_one_whole_checkpoint(tmp_path):
    path = tmp_path / "latest.st"
    lm.save(version(0), path)
    stop, errors, seen = threading.Event(), [], set()

    def writer():
        i = 1
        while not stop.is_set():
            try:
                lm.save(version(i), path, durable=False)
            except Exception as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        # a reader in another process too: the files it sees come and go under a real concurrent rename
        reader = subprocess.Popen([sys.executable, "-c", READER, str(path), str(ROUNDS * 3)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(ROUNDS * 3):
            seen.add(whole_version(lm.load(path, backend="numpy")))
            net_state = lm.load(path, backend="numpy")
            whole_version(net_state)
        out, err = reader.communicate(timeout=300)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert reader.returncode == 0, err
    assert len(seen) > 1 or ROUNDS < 10  # it did race


READER = """
import sys, numpy as np, lamina as lm
path, rounds = sys.argv[1], int(sys.argv[2])
for _ in range(rounds):
    d = lm.load(path, backend="numpy")
    i = int(d["c"][0])
    assert (np.asarray(d["a"]) == i).all() and (np.asarray(d["b"]) == i).all() and (np.asarray(d["c"]) == i).all()
"""


def test_load_into_racing_a_writer_gives_one_whole_model(tmp_path):
    class Net(lm.Module):
        def __init__(self):
            super().__init__()
            self.a = lm.Parameter((N,), init=lm.init.zeros())
            self.b = lm.Buffer(np.zeros(N // 2, np.int64))
            self.c = lm.Parameter((7,), init=lm.init.zeros(), dtype="float64")

        def forward(self, x):
            return x

    path = tmp_path / "m.st"
    lm.save(version(0), path)
    stop = threading.Event()

    def writer():
        i = 1
        while not stop.is_set():
            lm.save(version(i), path, durable=False)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        net = Net()
        for _ in range(ROUNDS):
            lm.load_into(net, path)
            whole_version({k: lm.backend_of(v).to_numpy(v) for k, v in net.state_dict().items()})
    finally:
        stop.set()
        t.join()


def test_threads_saving_to_one_path_leave_one_whole_private_file(tmp_path, monkeypatch):
    old = os.umask(0o022)
    try:
        errors, umask_calls = [], []
        real_umask = os.umask
        monkeypatch.setattr(os, "umask", lambda m: umask_calls.append(m) or real_umask(m))

        def saver(i):
            try:
                for j in range(max(2, ROUNDS // 10)):
                    lm.save(version(i * 100 + j), tmp_path / "shared.st", durable=False)
                    lm.save(np.zeros(3), tmp_path / f"new-{i}-{j}.st", durable=False)  # files created anew
            except Exception as e:  # noqa: BLE001 - reported by the test
                errors.append(e)

        threads = [threading.Thread(target=saver, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        monkeypatch.undo()
        assert not errors, errors
        assert not umask_calls  # the process umask is never changed, not even for an instant
        whole_version(lm.load(tmp_path / "shared.st", backend="numpy"))
        for f in os.listdir(tmp_path):
            mode = (tmp_path / f).stat().st_mode & 0o777
            assert mode == 0o644, (f, oct(mode))  # exactly what the umask gives a new file: never world-writable
    finally:
        os.umask(old)
