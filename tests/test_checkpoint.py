"""The "File I/O" part of the builders' guide: checkpoints in safetensors, on every backend."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import lamina as lm

from conftest import BACKENDS, MyDense, MyLinear, rand, to_np


def on(backend, a):
    return lm.get_backend(backend).from_numpy(np.asarray(a))


DTYPE_SAMPLES = {
    "float32": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
    "float64": np.arange(3, dtype=np.float64) / 3,
    "float16": np.array([1.5, -2.25], np.float16),
    "bfloat16": np.array([1.5, -2.0, 3.0], ml_dtypes.bfloat16),
    "int64": np.array([1, -(2**40)], np.int64),
    "int32": np.array([7, -8], np.int32),
    "int8": np.array([-128, 127], np.int8),
    "uint8": np.array([0, 255], np.uint8),
    "bool": np.array([True, False, True]),
    "scalar": np.array(2.5, np.float32),
}


def portable(backend):
    """The sample dtypes a backend holds exactly (jax keeps 64-bit types as 32-bit unless x64 is on)."""
    if backend == "jax" and not __import__("jax").config.jax_enable_x64:
        return [d for d in DTYPE_SAMPLES if d not in ("float64", "int64")]
    return list(DTYPE_SAMPLES)


def test_single_array_keeps_dtype_and_values(backend, tmp_path):
    for name in portable(backend):
        arr = on(backend, DTYPE_SAMPLES[name])
        lm.save(arr, tmp_path / f"{name}.safetensors")
        back = lm.load(tmp_path / f"{name}.safetensors")
        assert lm.backend_of(back).name == backend
        host = to_np(back)
        assert host.dtype == DTYPE_SAMPLES[name].dtype, name
        assert host.shape == DTYPE_SAMPLES[name].shape, name
        np.testing.assert_array_equal(host, DTYPE_SAMPLES[name])


def test_list_tuple_and_dict_keep_container_type_order_and_dtypes(backend, tmp_path):
    xs = [on(backend, DTYPE_SAMPLES["int32"]), on(backend, DTYPE_SAMPLES["float32"])]
    lm.save(xs, tmp_path / "list.safetensors")
    back = lm.load(tmp_path / "list.safetensors")
    assert isinstance(back, list) and len(back) == 2
    assert to_np(back[0]).dtype.kind == "i" and to_np(back[1]).dtype == np.float32
    lm.save(tuple(xs), tmp_path / "tuple.safetensors")
    assert isinstance(lm.load(tmp_path / "tuple.safetensors"), tuple)
    d = {"zeta": on(backend, DTYPE_SAMPLES["bool"]), "alpha": on(backend, DTYPE_SAMPLES["bfloat16"])}
    lm.save(d, tmp_path / "dict.safetensors")
    back = lm.load(tmp_path / "dict.safetensors")
    assert list(back) == ["zeta", "alpha"]  # insertion order, not the file's sorted order
    np.testing.assert_array_equal(to_np(back["zeta"]), DTYPE_SAMPLES["bool"])
    assert to_np(back["alpha"]).dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("src", BACKENDS)
@pytest.mark.parametrize("dst", BACKENDS)
def test_arrays_saved_on_one_backend_load_on_another(src, dst, tmp_path):
    lm.save({"w": on(src, DTYPE_SAMPLES["float32"]), "n": on(src, DTYPE_SAMPLES["int32"])}, tmp_path / "x.st")
    back = lm.load(tmp_path / "x.st", backend=dst)
    assert lm.backend_of(back["w"]).name == dst
    np.testing.assert_array_equal(to_np(back["w"]), DTYPE_SAMPLES["float32"])
    np.testing.assert_array_equal(to_np(back["n"]), DTYPE_SAMPLES["int32"])


def test_files_are_plain_safetensors_with_lamina_metadata(backend, tmp_path):
    net = lm.Sequential(lm.Linear(4, 3), lm.ReLU(), MyLinear(3, 2))
    lm.save(net, tmp_path / "net.safetensors")
    plain = safetensors.numpy.load_file(tmp_path / "net.safetensors")  # another reader opens it
    assert set(plain) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    np.testing.assert_array_equal(plain["2.weight"], to_np(net[2].weight))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "net.safetensors"), framework="np") as f:
        meta = f.metadata()
    assert meta["format"] == "lamina" and meta["format_version"] == "1" and meta["lamina_version"] == lm.__version__
    assert meta["kind"] == "module" and json.loads(meta["aliases"]) == {}


def clone_pair(backend):
    lm.manual_seed(1)
    a = lm.Sequential(lm.Linear(8), lm.ReLU(), MyLinear(8, 4), lm.TensorReduction(2))
    b = lm.Sequential(lm.Linear(8), lm.ReLU(), MyLinear(8, 4), lm.TensorReduction(2))
    return a, b


def test_save_model_rebuild_in_code_load_and_outputs_match(backend, tmp_path):
    original, clone = clone_pair(backend)
    x = rand(3, 5)
    y = to_np(original(x))
    lm.save(original, tmp_path / "m.safetensors")
    clone(rand(1, 5))  # built, with different values
    assert not np.allclose(to_np(clone(x)), y)
    lm.load_into(clone, tmp_path / "m.safetensors")
    np.testing.assert_array_equal(to_np(clone(x)), y)


def test_loading_into_a_never_called_lazy_model_materializes_it(backend, tmp_path):
    original, clone = clone_pair(backend)
    x = rand(3, 5)
    y = to_np(original(x))
    lm.save(original, tmp_path / "m.safetensors")
    assert not clone.get_parameter("0.weight").is_built
    lm.load_into(clone, tmp_path / "m.safetensors")
    assert clone.get_parameter("0.weight").shape == (5, 8) and clone[0].in_features == 5
    assert clone.get_parameter("3.weight").shape == (4, 4, 2)
    np.testing.assert_array_equal(to_np(clone(x)), y)


def test_layers_that_create_parameters_in_build_say_how_to_load(backend, tmp_path):
    lm.save(lm.Sequential(MyDense(3)).build((None, 4)), tmp_path / "d.st")
    fresh = lm.Sequential(MyDense(3))
    with pytest.raises(lm.CheckpointError, match=r"layers \['0'\] create their parameters in build\(\)"):
        lm.load_into(fresh, tmp_path / "d.st")
    fresh.build((None, 4))
    lm.load_into(fresh, tmp_path / "d.st")


@pytest.mark.parametrize("src", BACKENDS)
@pytest.mark.parametrize("dst", BACKENDS)
def test_model_saved_on_one_backend_loads_on_another(src, dst, tmp_path):
    lm.set_backend(src)
    lm.manual_seed(2)
    net = lm.Sequential(lm.Linear(6), lm.GELU(), MyLinear(6, 3), lm.LeadingFourier(split=True))
    x = rand(4, 5)
    y = to_np(net(x))
    lm.save(net, tmp_path / "m.st")
    lm.set_backend(dst)
    clone = lm.Sequential(lm.Linear(6), lm.GELU(), MyLinear(6, 3), lm.LeadingFourier(split=True))
    lm.load_into(clone, tmp_path / "m.st")
    out = clone(x)
    assert lm.backend_of(out).name == dst
    np.testing.assert_allclose(to_np(out), y, rtol=1e-5, atol=1e-5)


def tied_model():
    shared = lm.Linear(4, 4)
    return lm.Sequential(lm.Linear(3, 4), shared, lm.ReLU(), shared)


def test_tied_parameters_are_stored_once_and_retied_on_load(backend, tmp_path):
    net = tied_model()
    lm.save(net, tmp_path / "t.st")
    plain = safetensors.numpy.load_file(tmp_path / "t.st")
    assert set(plain) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t.st"), framework="np") as f:
        assert json.loads(f.metadata()["aliases"]) == {"3.weight": "1.weight", "3.bias": "1.bias"}
    # the architecture rebuilt in code without the tie: loading ties it again
    untied = lm.Sequential(lm.Linear(3, 4), lm.Linear(4, 4), lm.ReLU(), lm.Linear(4, 4))
    lm.load_into(untied, tmp_path / "t.st")
    assert untied.get_parameter("3.weight") is untied.get_parameter("1.weight")
    assert len(list(untied.parameters())) == 4
    x = rand(2, 3)
    np.testing.assert_allclose(to_np(untied(x)), to_np(net(x)), rtol=1e-6)
    tied_again = tied_model()
    lm.load_into(tied_again, tmp_path / "t.st")
    np.testing.assert_array_equal(to_np(tied_again(x)), to_np(net(x)))


def test_strict_loading_reports_everything_at_once_and_changes_nothing(backend):
    net = lm.Sequential(lm.Linear(4, 3), lm.ReLU(), lm.Linear(3, 2))
    before = {k: to_np(v).copy() for k, v in net.state_dict().items()}
    bad = {
        "0.weight": np.zeros((4, 3), np.float32),  # fine
        "0.bias": np.zeros(5, np.float32),  # wrong shape
        "2.weight": np.zeros((3, 2), np.int32),  # wrong dtype kind
        "9.weight": np.zeros(1, np.float32),  # unexpected
    }  # 2.bias missing
    with pytest.raises(lm.CheckpointError) as err:
        net.load_state_dict(bad)
    msg = str(err.value)
    assert "nothing was changed" in msg
    assert "missing keys (in the model, not in the checkpoint): ['2.bias']" in msg
    assert "unexpected keys (in the checkpoint, not in the model): ['9.weight']" in msg
    assert "0.bias: shape (5,) in the checkpoint, (3,) in the model" in msg
    assert "2.weight: dtype int32 in the checkpoint, float32 in the model" in msg
    after = {k: to_np(v) for k, v in net.state_dict().items()}
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def test_allow_missing_and_ignore_extra_relax_separately(backend):
    net = lm.Sequential(lm.Linear(4, 3))
    old_bias = to_np(net[0].bias).copy()
    w = np.ones((4, 3), np.float32)
    with pytest.raises(lm.CheckpointError, match="missing keys"):
        net.load_state_dict({"0.weight": w, "x": w}, ignore_extra=True)
    with pytest.raises(lm.CheckpointError, match="unexpected keys"):
        net.load_state_dict({"0.weight": w, "x": w}, allow_missing=True)
    net.load_state_dict({"0.weight": w, "x": w}, allow_missing=True, ignore_extra=True)
    np.testing.assert_array_equal(to_np(net[0].weight), 1)
    np.testing.assert_array_equal(to_np(net[0].bias), old_bias)
    net.load_state_dict({"0.weight": w * 2}, strict=False)
    np.testing.assert_array_equal(to_np(net[0].weight), 2)


def test_dtype_policy_casts_floats_only(backend):
    net = lm.Sequential(lm.Linear(2, 2))
    net.load_state_dict({"0.weight": np.full((2, 2), 0.5, np.float16), "0.bias": np.zeros(2, np.float64)})
    assert to_np(net[0].weight).dtype == np.float32
    np.testing.assert_array_equal(to_np(net[0].weight), 0.5)
    with pytest.raises(lm.CheckpointError, match="floating types are cast, integers only widened"):
        net.load_state_dict({"0.weight": np.ones((2, 2), np.int64), "0.bias": np.zeros(2, np.float32)})

    class Counter(lm.Module):
        def __init__(self, dtype):
            super().__init__()
            self.n = lm.Buffer(np.zeros((), dtype))

        def forward(self, x):
            return x

    wide = Counter(np.int64)
    wide.load_state_dict({"n": np.array(7, np.int32)})  # widening: fine (a jax checkpoint into torch)
    assert int(to_np(wide.n)) == 7
    with pytest.raises(lm.CheckpointError, match="dtype int64 in the checkpoint, int16 in the model"):
        Counter(np.int16).load_state_dict({"n": np.array(7, np.int64)})


def test_load_state_dict_copies_user_arrays(backend):
    net = lm.Sequential(lm.Linear(2))  # lazy: the loaded array becomes the parameter
    w = np.ones((3, 2), np.float32)
    net.load_state_dict({"0.weight": w}, allow_missing=True)
    w[...] = 7
    np.testing.assert_array_equal(to_np(net[0].weight), 1)


def test_torch_load_keeps_parameter_identity_for_optimizers(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed")
    lm.set_backend("torch")
    net = lm.Sequential(lm.Linear(3, 2))
    weight = net[0].weight
    opt = torch.optim.SGD([p.value for p in net.parameters()], lr=0.1)
    lm.save(lm.Sequential(lm.Linear(3, 2)), tmp_path / "o.st")
    lm.load_into(net, tmp_path / "o.st")
    assert net[0].weight is weight and opt.param_groups[0]["params"][0] is weight


def test_buffers_are_saved_and_non_persistent_ones_are_not(backend, tmp_path):
    class WithBuffers(lm.Module):
        def __init__(self):
            super().__init__()
            self.count = lm.Buffer(np.array([3], np.int32))
            self.scratch = lm.Buffer(np.zeros(2, np.float32), persistent=False)

        def forward(self, x):
            return x

    m = WithBuffers()
    lm.save(m, tmp_path / "b.st")
    assert set(safetensors.numpy.load_file(tmp_path / "b.st")) == {"count"}
    m2 = WithBuffers()
    m2.count = np.array([0], np.int32)
    lm.load_into(m2, tmp_path / "b.st")
    np.testing.assert_array_equal(to_np(m2.count), [3])


def test_saving_unbuilt_or_non_arrays_is_refused(backend, tmp_path):
    with pytest.raises(lm.CheckpointError, match=r"parameters \['0.weight'\] have no shape yet"):
        lm.save(lm.Sequential(lm.Linear(3)), tmp_path / "x.st")
    with pytest.raises(TypeError, match="element 1 of the list is a str"):
        lm.save([np.zeros(1), "no"], tmp_path / "x.st")
    with pytest.raises(TypeError, match="dict keys must be non-empty strings"):
        lm.save({1: np.zeros(1)}, tmp_path / "x.st")
    assert not (tmp_path / "x.st").exists()
    assert os.listdir(tmp_path) == []  # no temporary file left behind


# ----- damaged, foreign and interrupted files ---------------------------------------------------------
def good_file(tmp_path):
    path = tmp_path / "good.st"
    lm.save({"w": np.arange(100, dtype=np.float32)}, path)
    return path, path.read_bytes()


@pytest.mark.parametrize(("name", "mangle", "reason"), [
    ("truncated", lambda raw: raw[: len(raw) // 2], "it is truncated: its header describes"),
    ("header_cut", lambda raw: raw[:20], "not a safetensors file, or it is truncated"),
    ("empty", lambda raw: b"", "the file is empty"),
    ("tiny", lambda raw: raw[:5], "too short to be a safetensors file"),
    ("bad_json", lambda raw: raw[:8] + b"X" + raw[9:], "header is not valid safetensors JSON"),
    ("random", lambda raw: bytes(range(256)) * 4, "not a safetensors file"),
    ("zip", lambda raw: b"PK\x03\x04" + raw[4:], "looks like a pickle or torch.save file"),
])
def test_damaged_files_give_a_clear_error_naming_the_file(backend, tmp_path, name, mangle, reason):
    path, raw = good_file(tmp_path)
    bad = tmp_path / f"{name}.st"
    bad.write_bytes(mangle(raw))
    for action in (lambda: lm.load(bad), lambda: lm.load_into(lm.Sequential(lm.Linear(2, 2)), bad)):
        with pytest.raises(lm.CheckpointError) as err:
            action()
        assert str(bad) in str(err.value) and reason in str(err.value)


def test_torch_save_file_is_refused_without_unpickling(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed")
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(lm.CheckpointError, match="lamina never unpickles"):
        lm.load(path)


def test_a_header_length_whose_first_byte_is_0x80_still_loads(tmp_path):
    """A safetensors file starts with its header's length (8 bytes, little endian): one in 256 lengths starts
    with the byte 0x80, a pickle's first byte too. Such a file is a checkpoint, not a pickle."""
    for extra in range(256):
        path = tmp_path / f"m{extra}.safetensors"
        lm.save({"w" + "x" * extra: np.arange(6, dtype=np.float32).reshape(2, 3)}, path)
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        raise AssertionError("no key length gave a header length starting with 0x80")
    (key, value), = lm.load(path).items()
    assert key == "w" + "x" * extra
    np.testing.assert_array_equal(np.asarray(value), np.arange(6, dtype=np.float32).reshape(2, 3))


def test_missing_file_and_folder(backend, tmp_path):
    with pytest.raises(lm.CheckpointError, match="no such file"):
        lm.load(tmp_path / "nope.st")
    with pytest.raises(lm.CheckpointError, match="it is a folder"):
        lm.load(tmp_path)
    with pytest.raises(lm.CheckpointError, match="does not exist"):
        lm.save(np.zeros(1), tmp_path / "no" / "such" / "x.st")


def test_newer_format_version_is_refused(backend, tmp_path):
    safetensors.numpy.save_file({"w": np.zeros(1, np.float32)}, tmp_path / "v9.st",
                                metadata={"format": "lamina", "format_version": "9"})
    with pytest.raises(lm.CheckpointError, match="format version '9' is not one this lamina"):
        lm.load(tmp_path / "v9.st")


def test_foreign_safetensors_files_load_as_dicts(backend, tmp_path):
    safetensors.numpy.save_file({"b": np.ones(2, np.float32), "a": np.zeros(1, np.int16)}, tmp_path / "f.st")
    back = lm.load(tmp_path / "f.st")
    assert set(back) == {"a", "b"} and to_np(back["a"]).dtype == np.int16


def test_interrupted_save_leaves_the_old_file_intact(backend, tmp_path, monkeypatch):
    import lamina.checkpoint as ckpt

    path = tmp_path / "model.st"
    net = lm.Sequential(lm.Linear(3, 2))
    lm.save(net, path)
    before = path.read_bytes()
    real = ckpt._write_all
    calls = []

    def crash_midway(fd, data):
        calls.append(1)
        if len(calls) == 2:  # the header is out, half of the first tensor too, when the "crash" comes
            real(fd, memoryview(data).cast("B")[: len(memoryview(data).cast("B")) // 2])
            raise KeyboardInterrupt("simulated crash during save")
        real(fd, data)

    monkeypatch.setattr(ckpt, "_write_all", crash_midway)
    net.reinitialize(lm.init.constant(5))
    with pytest.raises(KeyboardInterrupt):
        lm.save(net, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.st"]

    def disk_full(fd, data):  # a real full disk: some bytes go out, then write() fails with ENOSPC
        os.write(fd, memoryview(data).cast("B")[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_all", disk_full)
    with pytest.raises(lm.CheckpointError, match="No space left on device.*previous file, if any, is unchanged") \
            as err:
        lm.save(net, path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.st"]
    monkeypatch.undo()
    lm.load_into(net, path)  # the old checkpoint still loads
    assert not np.allclose(to_np(net[0].weight), 5)


def test_save_keeps_file_permissions(backend, tmp_path):
    path = tmp_path / "p.st"
    lm.save(np.zeros(1), path)
    os.chmod(path, 0o640)
    lm.save(np.ones(1), path)
    assert (path.stat().st_mode & 0o777) == 0o640


def test_failed_file_load_leaves_model_untouched(backend, tmp_path):
    lm.save(lm.Sequential(lm.Linear(4, 3), lm.ReLU(), lm.Linear(3, 5)), tmp_path / "other.st")
    net = lm.Sequential(lm.Linear(4, 3), lm.ReLU(), lm.Linear(3, 2))
    before = {k: to_np(v).copy() for k, v in net.state_dict().items()}
    with pytest.raises(lm.CheckpointError, match=r"2\.weight: shape \(3, 5\) in the checkpoint, \(3, 2\) in the model"):
        lm.load_into(net, tmp_path / "other.st")
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(to_np(v), before[k])  # 0.weight matched, yet was not written


# ----- issue 10: promises under faults, races and bad input ------------------------------------------
def raw_safetensors(path, tensors: dict, header_patch=None, meta=None, tail=b""):
    """Write a safetensors file by hand (an independent writer), optionally with a doctored header."""
    header, blobs, offset = {}, [], 0
    codes = {"float32": "F32", "float64": "F64", "int64": "I64", "float16": "F16"}
    for k, a in tensors.items():
        a = np.ascontiguousarray(a)
        header[k] = {"dtype": codes[a.dtype.name], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    if meta is not None:
        header["__metadata__"] = meta
    if header_patch is not None:
        header = header_patch(header)
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs) + tail)
    return path


def test_a_load_reads_one_file_even_if_a_save_renames_another_over_it_meanwhile(backend, tmp_path, monkeypatch):
    path = tmp_path / "latest.st"
    first = np.arange(1000, dtype=np.float32)
    lm.save({"w": first}, path)
    other = tmp_path / "other.st"
    lm.save({"w": -first - 1}, other, metadata={"padding": "x" * 300})  # another header size: other offsets
    real_loads, swapped = json.loads, []

    def loads_then_swap(*a, **k):  # a trainer's save lands right after the reader has read the header
        out = real_loads(*a, **k)
        if not swapped:
            swapped.append(1)
            os.replace(other, path)
        return out

    monkeypatch.setattr(json, "loads", loads_then_swap)
    back = lm.load(path, backend="numpy")
    monkeypatch.undo()
    assert swapped
    np.testing.assert_array_equal(back["w"], first)  # the whole old file, not a mix of the two


def test_reserved_keys_are_refused_before_anything_is_written(backend, tmp_path):
    path = tmp_path / "good.st"
    lm.save({"w": np.ones(3, np.float32)}, path)
    before = path.read_bytes()
    with pytest.raises(lm.CheckpointError, match="'__metadata__' is reserved"):
        lm.save({"__metadata__": np.zeros(2, np.float32)}, path)
    with pytest.raises(lm.CheckpointError, match="reserves for optimizer state"):
        lm.save({"@optimizer/0.weight/exp_avg": np.zeros(2, np.float32)}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["good.st"]


def test_load_into_with_an_optimizer_updates_both_or_neither(grad_backend, tmp_path):
    net = lm.Sequential(lm.Linear(3, 4), lm.ReLU(), lm.Linear(4, 2))
    opt = lm.optim.Adam(net, lr=0.1)
    lm.fit(net, lm.losses.mse, opt, [(rand(8, 3), rand(8, 2, seed=1))], epochs=1, progress=False)
    lm.save(net, tmp_path / "run.st", optimizer=opt)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run.st"), framework="np") as f:
        meta = f.metadata()
    arrays = safetensors.numpy.load_file(tmp_path / "run.st")
    arrays["@optimizer/2.bias/exp_avg"] = np.zeros(3, np.float32)  # a moment of the wrong shape
    safetensors.numpy.save_file(arrays, tmp_path / "run.st", metadata=meta)
    net2 = lm.Sequential(lm.Linear(3, 4), lm.ReLU(), lm.Linear(4, 2))
    opt2 = lm.optim.Adam(net2, lr=0.1)
    before = {k: to_np(v).copy() for k, v in net2.state_dict().items()}
    with pytest.raises(lm.CheckpointError, match="run.st") as err:
        lm.load_into(net2, tmp_path / "run.st", optimizer=opt2)
    assert "Neither the model nor the optimizer was changed" in str(err.value)
    for k, v in net2.state_dict().items():
        np.testing.assert_array_equal(to_np(v), before[k])
    assert opt2.steps == 0


def test_resuming_from_a_checkpoint_saved_before_the_first_step(grad_backend, tmp_path):
    lm.manual_seed(3)
    net = lm.Sequential(lm.Linear(3, 2))
    opt = lm.optim.Adam(net, lr=0.1)
    lm.save(net, tmp_path / "start.st", optimizer=opt)  # no step yet: no moments to store
    net2 = lm.Sequential(lm.Linear(3, 2))
    opt2 = lm.optim.Adam(net2, lr=0.1)
    lm.load_into(net2, tmp_path / "start.st", optimizer=opt2)
    batches = [(rand(8, 3), rand(8, 2, seed=1))]
    a = lm.fit(net, lm.losses.mse, opt, batches, epochs=2, progress=False)
    b = lm.fit(net2, lm.losses.mse, opt2, batches, epochs=2, progress=False)
    assert a["loss"] == b["loss"] and opt2.steps == opt.steps == 2


def test_stale_temporary_files_of_a_killed_save_are_removed_by_the_next_save(backend, tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.st.lamina-tmp-{dead.pid}-0badf00d"
    stale.write_bytes(b"\0" * 1000)
    live = tmp_path / f".m.st.lamina-tmp-{os.getpid()}-12345678"  # a save of this process, in flight
    live.write_bytes(b"")
    other = tmp_path / f".n.st.lamina-tmp-{dead.pid}-0badf00d"  # another target's: not ours to judge now
    other.write_bytes(b"")
    lm.save(np.zeros(2), tmp_path / "m.st")
    assert sorted(os.listdir(tmp_path)) == sorted(["m.st", live.name, other.name])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_at_once(backend, tmp_path):
    import subprocess
    import sys

    fifo = tmp_path / "pipe.st"
    os.mkfifo(fifo)
    code = (f"import lamina as lm, sys\nlm.set_backend({backend!r})\n"
            "for action in (lambda: lm.load(sys.argv[1]), lambda: lm.load_into(lm.Linear(2, 2), sys.argv[1])):\n"
            "    try:\n        action()\n        print('loaded')\n"
            "    except lm.CheckpointError as e:\n        print(e)\n")
    try:  # in a child process: a load that blocks on the FIFO must not hang the test run
        out = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("loading a FIFO blocked")
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all("not a regular file" in o and str(fifo) in o for o in lines), out


class WithBuffer(lm.Module):
    def __init__(self):
        super().__init__()
        self.w = lm.Parameter((3,), init=lm.init.constant(1.0))
        self.stat = lm.Buffer(np.zeros(3, np.float32))
        self.w64 = lm.Parameter((3,), init=lm.init.constant(1.0), dtype="float64")

    def forward(self, x):
        return x * self.w + self.stat


def module_meta(aliases, keys):
    return {"format": "lamina", "format_version": "1", "kind": "module", "aliases": json.dumps(aliases),
            "keys": json.dumps(keys)}


def test_lying_aliases_are_refused(backend, tmp_path):
    vals = {"w": np.full(3, 2, np.float32), "stat": np.full(3, 5, np.float32), "w64": np.full(3, 3, np.float64)}
    cases = {  # alias: what it would do
        "buffer_to_param": ({"stat": "w"}, ["w", "w64"], "it is a buffer in the model and parameter"),
        "dtype_change": ({"w64": "w"}, ["w", "stat"], "dtype float64"),
        "not_in_file": ({"stat": "nope"}, ["w", "w64"], "holds no such parameter tensor"),
    }
    for name, (aliases, keys, reason) in cases.items():
        path = raw_safetensors(tmp_path / f"{name}.st", {k: vals[k] for k in keys}, meta=module_meta(aliases, keys))
        m = WithBuffer()
        before = {k: to_np(v).copy() for k, v in m.state_dict().items()}
        with pytest.raises(lm.CheckpointError, match=reason) as err:
            lm.load_into(m, path)
        assert str(path) in str(err.value), name
        assert m.get_parameter("stat") is not m.get_parameter("w") and m.get_parameter("w64").dtype == "float64"
        for k, v in m.state_dict().items():
            np.testing.assert_array_equal(to_np(v), before[k])


def test_untied_checkpoint_into_a_model_with_a_shared_layer_is_refused(backend, tmp_path):
    lm.save(lm.Sequential(lm.Linear(4, 4), lm.ReLU(), lm.Linear(4, 4)), tmp_path / "untied.st")
    shared = lm.Linear(4, 4)
    net = lm.Sequential(shared, lm.ReLU(), shared)
    before = to_np(shared.weight).copy()
    with pytest.raises(lm.CheckpointError, match="one shared parameter in the model"):
        lm.load_into(net, tmp_path / "untied.st")
    np.testing.assert_array_equal(to_np(shared.weight), before)


def test_a_tie_structure_mismatch_is_explained(backend, tmp_path):
    s = lm.Linear(4, 4)
    lm.save(lm.Sequential(lm.Linear(4, 4), s, lm.ReLU(), s), tmp_path / "t.st")  # file: 3 tied to 1
    t = lm.Linear(4, 4)
    net = lm.Sequential(t, lm.Linear(4, 4), lm.ReLU(), t)  # model: 3 shared with 0
    with pytest.raises(lm.CheckpointError, match=r"0\.weight, 3\.weight: one shared parameter"):
        lm.load_into(net, tmp_path / "t.st")


def test_non_string_keys_in_load_state_dict_are_a_clear_type_error(backend):
    net = lm.Linear(2, 2)
    with pytest.raises(TypeError, match="keys must be strings"):
        net.load_state_dict({0: np.zeros((2, 2), np.float32), "bias": np.zeros(2, np.float32)})


def test_torch_load_into_invalidates_graphs_recorded_before_it(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed")
    old = lm.get_backend().name
    lm.set_backend("torch")
    try:
        net = lm.Sequential(lm.Linear(3, 4), lm.Tanh(), lm.Linear(4, 1))
        lm.save(net, tmp_path / "w.st")
        x = torch.ones(2, 3, requires_grad=True)
        loss = net(x).sum()  # the graph keeps the weights it used
        lm.load_into(net, tmp_path / "w.st")
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()  # as after net.load_state_dict(...): old activations never meet new weights
    finally:
        lm.set_backend(old)


def patch_meta(**changes):
    def patch(header):
        header["__metadata__"].update(changes)
        return header
    return patch


BAD_HEADERS = {  # name: (header patch, words the error must contain)
    "not_an_object": (lambda h: json.dumps([1, 2]).encode(), "not an object"),
    "deep_nesting": (lambda h: b"[" * 100000 + b"]" * 100000, "not valid safetensors JSON"),
    "offsets_wrong_type": (lambda h: {**h, "w": {**h["w"], "data_offsets": ["0", "40"]}}, "data_offsets"),
    "offsets_one_number": (lambda h: {**h, "w": {**h["w"], "data_offsets": 40}}, "data_offsets"),
    "shape_wrong_type": (lambda h: {**h, "w": {**h["w"], "shape": "10"}}, "has shape"),
    "absurd_shape": (lambda h: {**h, "w": {**h["w"], "shape": [2**40, 2**40, 0]}}, "impossible shape"),
    "negative_dim": (lambda h: {**h, "w": {**h["w"], "shape": [-10]}}, "has shape"),
    "bool_dims": (lambda h: {**h, "w": {**h["w"], "shape": [True]}}, "has shape"),
    "unknown_dtype": (lambda h: {**h, "w": {**h["w"], "dtype": "F8_E4M3"}}, "has dtype 'F8_E4M3'"),
    "entry_not_object": (lambda h: {**h, "w": 7}, "is not an object"),
    "metadata_not_strings": (patch_meta(kind=3), "__metadata__ is not a mapping"),
    "keys_wrong_type": (patch_meta(keys='"w"'), "'keys' is not a list"),
    "keys_not_json": (patch_meta(keys="[w"), "'keys' is not valid JSON"),
    "keys_nested_deep": (patch_meta(keys="[" * 100000), "'keys' is not valid JSON"),
    "unknown_kind": (patch_meta(kind="pickle"), "'kind' is 'pickle'"),
    "list_with_wrong_names": (patch_meta(kind="list", keys='["w"]'), "holds a list"),
    "aliases_not_mapping": (patch_meta(kind="module", aliases="[1]"), "'aliases' is not a mapping"),
    "aliases_bad_json": (patch_meta(kind="module", aliases="{"), "'aliases' is not valid JSON"),
    "bad_steps": (patch_meta(optimizer_steps="-1"), "'optimizer_steps'"),
    "overlapping_data": (lambda h: {**h, "w": {**h["w"], "data_offsets": [4, 44]}}, "starts at byte 4"),
    "duplicate_keys": (lambda h: json.dumps(h).replace('"format"', '"kind":"dict","kind"', 1).encode(),
                       "duplicate key"),
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_malformed_headers_give_a_checkpoint_error_naming_the_file(backend, tmp_path, name):
    patch, words = BAD_HEADERS[name]
    meta = {"format": "lamina", "format_version": "1", "kind": "dict", "keys": '["w"]'}
    path = raw_safetensors(tmp_path / f"{name}.st", {"w": np.arange(10, dtype=np.float32)}, patch, meta)
    for action in (lambda: lm.load(path), lambda: lm.load_into(lm.Sequential(lm.Linear(2, 2)), path)):
        with pytest.raises(lm.CheckpointError) as err:
            action()
        assert str(path) in str(err.value) and words in str(err.value), str(err.value)


def test_trailing_bytes_are_refused(backend, tmp_path):
    path = raw_safetensors(tmp_path / "tail.st", {"w": np.arange(10, dtype=np.float32)}, tail=b"junk")
    with pytest.raises(lm.CheckpointError, match="something was appended"):
        lm.load(path)
