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
    path = tmp_path / "model.st"
    net = lm.Sequential(lm.Linear(3, 2))
    lm.save(net, path)
    before = path.read_bytes()
    real = safetensors.numpy.save_file

    def crash_midway(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # half the bytes are out when the "crash" comes
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt("simulated crash during save")

    monkeypatch.setattr(safetensors.numpy, "save_file", crash_midway)
    net.reinitialize(lm.init.constant(5))
    with pytest.raises(KeyboardInterrupt):
        lm.save(net, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.st"]

    def disk_full(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(lm.CheckpointError, match="No space left on device.*previous file, if any, is unchanged"):
        lm.save(net, path)
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
