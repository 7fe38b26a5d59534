"""The redesigned core: one keeper of parameter values, public build and mode helpers, copies, moves,
thread-local state, and the PyTorch habits that Module supports (issues 8, 9 and 10)."""

from __future__ import annotations

import copy
import threading
import warnings

import numpy as np
import pytest

import lamina as lm
from lamina import context

from conftest import BACKENDS, MyLinear, rand, to_np


# ----- one keeper: Parameter.set_value ------------------------------------------------------------
def test_set_value_shows_the_array_to_every_owner(backend):
    shared = lm.Linear(3, 3)
    net = lm.Sequential(shared, lm.ReLU(), shared)
    p = shared.get_parameter("weight")
    b = lm.get_backend(backend)
    new = b.from_numpy(np.eye(3, dtype=np.float32))
    p.set_value(new)
    np.testing.assert_array_equal(to_np(net[0].weight), np.eye(3))
    np.testing.assert_array_equal(to_np(net[2].weight), np.eye(3))
    np.testing.assert_array_equal(p.numpy(), np.eye(3))


def test_set_value_refuses_wrong_shape_dtype_and_foreign_arrays(backend):
    layer = lm.Linear(2, 3)
    p = layer.get_parameter("weight")
    before = p.numpy().copy()
    b = lm.get_backend(backend)
    with pytest.raises(lm.ShapeError, match=r"shape \(2, 3\).*\(3, 2\)"):
        p.set_value(b.from_numpy(np.zeros((3, 2), np.float32)))
    with pytest.raises(TypeError, match="dtype float32"):
        p.set_value(b.from_numpy(np.zeros((2, 3), np.int32)))
    if backend != "numpy":
        with pytest.raises(TypeError, match="set_value"):
            p.set_value(np.zeros((2, 3), np.float32))
    np.testing.assert_array_equal(p.numpy(), before)


# ----- parameters as torch users make them ------------------------------------------------------
def test_parameter_from_an_array_positionally(backend):
    values = rand(3, 4)
    p = lm.Parameter(lm.get_backend(backend).from_numpy(values))
    assert p.shape == (3, 4) and p.dtype == "float32"
    np.testing.assert_array_equal(p.numpy(), values)
    np.testing.assert_array_equal(np.asarray(p), values)  # np.asarray(parameter) gives its values


def test_parameter_path_is_its_identity():
    lm.set_backend("numpy")
    net = lm.Sequential(lm.Linear(2, 3), lm.Sequential(lm.Linear(3, 1)))
    assert net[1][0].get_parameter("weight").path == "1.0.weight"
    assert lm.Parameter((2,)).path == ""


def test_add_module_register_parameter_and_register_buffer(backend):
    m = lm.Module()
    m.add_module("lin", lm.Linear(2, 2))
    m.register_parameter("scale", lm.Parameter((2,), init=lm.init.ones()))
    m.register_buffer("table", np.arange(3))
    m.register_buffer("scratch", np.zeros(2, np.float32), persistent=False)
    assert sorted(m.state_dict()) == ["lin.bias", "lin.weight", "scale", "table"]
    assert [k for k, _ in m.named_buffers()] == ["table", "scratch"]
    np.testing.assert_array_equal(to_np(m.table), np.arange(3))
    with pytest.raises(ValueError, match="without '.'"):
        m.add_module("a.b", lm.ReLU())
    with pytest.raises(TypeError, match="lm.Module"):
        m.add_module("x", 3)


# ----- building -----------------------------------------------------------------------------------
class HalfBuilt(lm.Module):
    """A build hook that registers a parameter, fixes another's shape, then fails."""

    def __init__(self):
        super().__init__()
        self.w = lm.Parameter((None, 3))

    def build(self, input_shape):
        self.extra = lm.Parameter((2,))
        self.get_parameter("w").materialize((input_shape[-1], 3))
        raise RuntimeError("build failed halfway")

    def forward(self, x):
        return x @ self.w


def test_a_build_that_fails_halfway_leaves_the_layer_as_it_was(backend, tmp_path):
    m = HalfBuilt()
    with pytest.raises(RuntimeError, match="halfway"):
        m(rand(2, 4))
    assert [k for k, _ in m.named_parameters()] == ["w"]
    assert m.get_parameter("w").shape == (None, 3)
    with pytest.raises(lm.CheckpointError, match="no shape yet"):  # nothing half-built can be saved
        lm.save(m, tmp_path / "half.safetensors")
    assert not (tmp_path / "half.safetensors").exists()


def test_value_and_grad_builds_a_lazy_model_called_with_labels(grad_backend):
    """The loss function takes (model, x, y): only it knows that y does not go to the model."""
    model = lm.Sequential(lm.Linear(4), lm.ReLU(), lm.Linear(1))
    x, y = rand(8, 3), rand(8, 1, seed=1)
    loss, grads = lm.value_and_grad(lambda m, x, y: lm.losses.mse(m(x), y))(model, x, y)
    assert sorted(grads) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    w0, b0 = (model.get_parameter(k).numpy() for k in ("0.weight", "0.bias"))
    w2, b2 = (model.get_parameter(k).numpy() for k in ("2.weight", "2.bias"))
    ref = np.mean((np.maximum(x @ w0 + b0, 0) @ w2 + b2 - y) ** 2)
    np.testing.assert_allclose(float(to_np(loss)), ref, rtol=1e-5)


def test_mode_restores_each_modules_own_mode(backend):
    net = lm.Sequential(lm.Dropout(0.5), lm.Linear(2, 2))
    net[0].eval()
    with net.mode(True):
        assert net.training and net[0].training
    assert net.training and not net[0].training


def test_functional_call_takes_named_parameters(backend):
    layer = MyLinear(3, 2)
    x = rand(4, 3)
    out = lm.functional_call(layer, dict(layer.named_parameters()), x)
    np.testing.assert_allclose(to_np(out), to_np(layer(x)), rtol=1e-6)


# ----- copies and moves ---------------------------------------------------------------------------
def test_a_deepcopy_before_the_first_call_equals_its_original(backend):
    net = lm.Sequential(lm.Linear(4), lm.ReLU(), lm.Linear(2))  # lazy: no values drawn yet
    twin = copy.deepcopy(net)
    x = rand(3, 5)
    np.testing.assert_array_equal(to_np(twin(x)), to_np(net(x)))
    eager = lm.Linear(5, 2)
    np.testing.assert_array_equal(to_np(copy.deepcopy(eager)(x)), to_np(eager(x)))


def test_to_takes_a_device_positionally(backend):
    layer = lm.Linear(2, 2)
    assert layer.to("cpu") is layer and layer.device == "cpu"
    with pytest.raises(lm.DeviceError, match="no device"):
        layer.to("cuda:7")
    with pytest.raises(lm.BackendError, match="unknown backend"):
        layer.to(backend="nope")


@pytest.mark.skipif(not {"torch", "jax"} <= set(BACKENDS), reason="needs torch and jax")
def test_moving_between_backends_copies_so_training_never_writes_under_a_held_array():
    lm.set_backend("jax")
    layer = lm.Linear(3, 2)
    held = layer.weight  # a jax array the user keeps
    before = np.array(held)
    layer.to(backend="torch")
    with __import__("torch").no_grad():
        layer.weight.add_(1.0)  # torch trains in place
    np.testing.assert_array_equal(np.array(held), before)


# ----- deprecations -------------------------------------------------------------------------------
def test_module_predict_still_works_with_a_deprecation_warning():
    lm.set_backend("numpy")
    layer = lm.Linear(2, 1, weight_init=lm.init.ones())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer.predict(np.ones((3, 2), np.float32))
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    np.testing.assert_allclose(to_np(out), np.full((3, 1), 2.0))


# ----- thread-local state -------------------------------------------------------------------------
def test_pure_call_frames_and_key_scopes_are_per_thread():
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name):
        frames, scopes = context.pure_frames(), context.key_scopes()
        frames.append({"writes": {}, "written": {}, "paths": {}})
        scopes.append([name, 0])
        barrier.wait()
        seen[name] = (len(context.pure_frames()), context.key_scopes()[-1][0])
        frames.pop()
        scopes.pop()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": (1, "a"), "b": (1, "b")}
    assert context.pure_frames() == [] and context.key_scopes() == []


def test_pure_calls_and_plain_calls_on_different_models_in_threads(grad_backend):
    """BatchNorm records its buffer writes in the pure-call frame of its own thread only: a plain call in
    another thread must update its own running statistics, and the pure call must not."""
    pure_model, plain_model = lm.BatchNorm1d(), lm.BatchNorm1d()
    x = rand(16, 4) * 3 + 1
    pure_model(x), plain_model(x)  # build both
    errors = []

    def pure():
        try:
            for _ in range(20):
                lm.functional_call(pure_model, {}, x, return_buffers=True)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def plain():
        try:
            for _ in range(20):
                plain_model(x)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ts = [threading.Thread(target=pure), threading.Thread(target=plain)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    # the pure model saw one plain call (the build); the plain one saw 21, approaching the batch mean
    mean = x.mean(0)
    np.testing.assert_allclose(pure_model.get_parameter("running_mean").numpy(), 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(plain_model.get_parameter("running_mean").numpy(), mean * (1 - 0.9**21), rtol=1e-4)


# ----- torch habits: in-place initializers inside apply(fn) ---------------------------------------
def test_in_place_initializers_inside_apply(backend):
    net = lm.Sequential(lm.Linear(50, 400), lm.ReLU(), lm.Linear(400, 2))
    own = net[0].get_parameter("weight").init

    def init_weights(m):
        if type(m) is lm.Linear:
            lm.init.normal_(m.weight, mean=0.5, std=0.01)
            lm.init.constant_(m.bias, 3.0)

    net.apply(init_weights)
    w = net.get_parameter("0.weight").numpy()
    assert abs(w.mean() - 0.5) < 1e-3 and abs(w.std() - 0.01) < 1e-3  # 20,000 draws of N(0.5, 0.01^2)
    np.testing.assert_array_equal(net.get_parameter("2.bias").numpy(), [3.0, 3.0])
    assert net[0].get_parameter("weight").init is own  # reinitialize() still uses the layer's own
    lm.init.zeros_(net[2].get_parameter("weight"))  # a Parameter object works too
    np.testing.assert_array_equal(to_np(net[2].weight), np.zeros((400, 2)))
    with pytest.raises(TypeError, match="not a parameter"):
        lm.init.normal_(lm.get_backend(backend).from_numpy(np.zeros(3, np.float32)))


def test_in_place_initializers_give_the_same_values_on_every_backend():
    values = []
    for name in BACKENDS:
        lm.set_backend(name)
        lm.manual_seed(7)
        layer = lm.Linear(3, 4)
        lm.init.xavier_normal_(layer.weight)
        values.append(layer.get_parameter("weight").numpy())
    for v in values[1:]:
        np.testing.assert_array_equal(v, values[0])


def test_parameter_of_finds_the_parameter_behind_an_array(backend):
    layer = lm.Linear(2, 3)
    assert lm.Parameter.of(layer.weight) is layer.get_parameter("weight")
    assert lm.Parameter.of(lm.get_backend(backend).from_numpy(np.zeros(2, np.float32))) is None


# ----- inputs: containers pass through ------------------------------------------------------------
class Decoder(lm.Module):
    def forward(self, X, state):
        enc_outputs, valid_lens, caches = state
        return X + enc_outputs, valid_lens, caches


def test_a_list_state_stays_a_list_and_its_arrays_are_converted(backend):
    dec = Decoder()
    x, enc = rand(2, 3), rand(2, 3, seed=1)
    out, lens, caches = dec(x, [enc, np.array([1, 2]), [None] * 2])
    assert lm.backend_of(out).name == backend and lm.backend_of(lens).name == backend
    assert caches == [None, None]
    np.testing.assert_allclose(to_np(out), x + enc, rtol=1e-6)
    assert to_np(lm.Identity()([[1.0, 2.0], [3.0, 4.0]])).shape == (2, 2)  # a list of numbers is one array


# ----- arrays that forward stores on the module (the textbook's self.attention_weights) ------------
class KeepsWeights(lm.Module):
    def __init__(self):
        super().__init__()
        self.lin = lm.Linear(4, 4)

    def forward(self, x):
        w = lm.ops.softmax(self.lin(x), -1)
        self.attention_weights = w
        return (w * x).sum()


def test_an_attribute_set_in_forward_comes_out_of_value_and_grad_concrete(grad_backend):
    m = KeepsWeights()
    x = rand(2, 4)
    lm.value_and_grad(lambda m, x: m(x))(m, x)
    w, b = m.lin.get_parameter("weight").numpy(), m.lin.get_parameter("bias").numpy()
    z = x @ w + b
    ref = np.exp(z - z.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(to_np(m.attention_weights), ref, rtol=1e-5)
    np.testing.assert_allclose(to_np(m(x)), (ref * x).sum(), rtol=1e-5)  # and the model still runs


def test_no_tracer_is_left_behind_under_a_users_jit():
    jax = pytest.importorskip("jax")
    lm.set_backend("jax")
    m = KeepsWeights()
    x = rand(2, 4)
    m(x)
    eager = to_np(m.attention_weights)
    params = {k: p.value for k, p in m.named_parameters()}
    jax.jit(lambda ps, x: lm.functional_call(m, ps, x))(params, x)
    np.testing.assert_array_equal(to_np(m.attention_weights), eager)  # the previous value, not a tracer
    m(x + 1)  # reads the attribute path again without UnexpectedTracerError


def test_a_state_dict_listing_a_tie_under_both_paths_loads_when_the_values_agree(backend):
    shared = lm.Linear(3, 3)
    net = lm.Sequential(shared, lm.ReLU(), shared)
    w = rand(3, 3)
    state = {"0.weight": w, "0.bias": np.zeros(3, np.float32), "2.weight": w.copy(), "2.bias": np.zeros(3, np.float32)}
    net.load_state_dict(state)
    np.testing.assert_array_equal(net.get_parameter("2.weight").numpy(), w)
    assert net[0].get_parameter("weight") is net[2].get_parameter("weight")
    state["2.weight"] = w + 1  # disagreeing copies of one shared parameter: refused, nothing changed
    with pytest.raises(lm.CheckpointError, match="one shared parameter"):
        net.load_state_dict(state)
    np.testing.assert_array_equal(net.get_parameter("0.weight").numpy(), w)


def test_int64_values_that_jax_would_wrap_are_refused():
    jax = pytest.importorskip("jax")
    if jax.config.jax_enable_x64:
        pytest.skip("x64 is on: jax keeps int64")
    b = lm.get_backend("jax")
    with pytest.raises(ValueError, match="do not fit"):
        b.from_numpy(np.array([1, 2**31 + 5], np.int64))
    np.testing.assert_array_equal(np.asarray(b.from_numpy(np.array([-(2**31), 2**31 - 1]))), [-(2**31), 2**31 - 1])


def test_registering_under_a_name_the_module_uses_is_refused(backend):
    m = lm.Sequential(lm.Linear(2, 2))
    m.units = 3
    x = rand(1, 2)
    before = to_np(m(x))
    for name in ("forward", "training", "units", "_params"):
        with pytest.raises(KeyError, match="already exists"):
            m.add_module(name, lm.Linear(2, 5))
    with pytest.raises(KeyError, match="already exists"):
        m.register_buffer("forward", np.zeros(2, np.float32))
    np.testing.assert_array_equal(to_np(m(x)), before)  # forward is still the class's


def test_load_state_dict_and_to_refuse_what_they_cannot_take(backend):
    m = lm.Linear(2, 2)
    with pytest.raises(TypeError, match="takes a mapping"):
        m.load_state_dict([np.zeros((2, 2))])
    with pytest.raises(TypeError, match="not dtypes"):
        m.to("float64")
    with pytest.raises(TypeError, match="not dtypes"):
        m.to(np.float64)


def test_a_foreign_file_with_a_square_linear_weight_is_refused_and_transposes_are_explained(backend, tmp_path):
    """Issue 9: a PyTorch weight (out, in) loaded into a square Linear (in, out) computed the wrong thing."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    w = rand(3, 3)
    path = tmp_path / "from_torch.safetensors"
    safetensors_numpy.save_file({"weight": w, "bias": np.zeros(3, np.float32)}, str(path))  # no Lamina metadata
    layer = lm.Linear(3, 3)
    before = layer.get_parameter("weight").numpy().copy()
    with pytest.raises(lm.CheckpointError, match="lm.load_torch"):
        lm.load_into(layer, path)
    np.testing.assert_array_equal(layer.get_parameter("weight").numpy(), before)
    lm.load_torch(layer, lm.load(path, backend="numpy"))  # the documented way: torch's layout converted
    np.testing.assert_array_equal(layer.get_parameter("weight").numpy(), w.T)
    wide = lm.Linear(3, 5)
    with pytest.raises(lm.CheckpointError, match="transposed"):
        wide.load_state_dict({"weight": rand(5, 3), "bias": np.zeros(5, np.float32)})
    lm.save(layer, tmp_path / "own.safetensors")  # Lamina's own files are not ambiguous
    lm.load_into(lm.Linear(3, 3), tmp_path / "own.safetensors")


def test_int64_values_jax_would_wrap_are_refused_on_every_path(tmp_path):
    jax = pytest.importorskip("jax")
    if jax.config.jax_enable_x64:
        pytest.skip("x64 is on: jax keeps int64")
    lm.set_backend("numpy")
    src = lm.BatchNorm1d(2)
    src(rand(3, 2))
    state = dict(src.state_dict())
    state["num_batches_tracked"] = np.array(2**40 + 5, np.int64)
    state["weight"] = np.full(2, 7.0, np.float32)
    lm.set_backend("jax")
    dst = lm.BatchNorm1d(2)
    dst(rand(3, 2))
    before = {k: to_np(v).copy() for k, v in dst.state_dict().items()}
    with pytest.raises(lm.CheckpointError, match="do not fit the int32"):
        dst.load_state_dict(state)  # all or nothing: the weight is not written either
    lm.set_backend("numpy")
    lm.save(state, tmp_path / "big.safetensors")
    with pytest.raises(lm.CheckpointError, match="big.safetensors"):
        lm.load_into(dst, tmp_path / "big.safetensors")
    for k, v in dst.state_dict().items():
        np.testing.assert_array_equal(to_np(v), before[k])
    src.load_state_dict(state)
    with pytest.raises(ValueError, match="do not fit"):
        src.to(backend="jax")  # converted before anything moves
    assert src.backend == "numpy"


def test_functional_call_converts_and_checks_the_values_it_is_given(backend):
    layer = lm.Linear(2, 3)
    x = rand(1, 2)
    out = lm.functional_call(layer, {"weight": np.ones((2, 3)), "bias": np.zeros(3)}, x)  # NumPy, float64
    assert lm.backend_of(out).name == backend
    np.testing.assert_allclose(to_np(out), x @ np.ones((2, 3)), rtol=1e-6)
    with pytest.raises(lm.ShapeError, match=r"'weight' has shape \(2, 3\).*\(3, 2\)"):
        lm.functional_call(layer, {"weight": np.ones((3, 2))}, x)
    with pytest.raises(lm.ParameterNotFoundError, match="no parameter \\['nope'\\]") as e:
        lm.functional_call(layer, {"nope": np.ones(1)}, x)
    assert isinstance(e.value, KeyError) and not str(e.value).startswith('"')
    with pytest.raises(TypeError, match="mapping"):
        lm.functional_call(layer, [np.ones((2, 3))], x)


def test_saving_through_a_symlink_writes_the_target_and_keeps_the_link(tmp_path):
    lm.set_backend("numpy")
    target = tmp_path / "runs" / "best.safetensors"
    target.parent.mkdir()
    lm.save({"w": np.zeros(2, np.float32)}, target)
    link = tmp_path / "latest.safetensors"
    link.symlink_to(target)
    lm.save({"w": np.ones(2, np.float32)}, link)
    assert link.is_symlink()
    np.testing.assert_array_equal(to_np(lm.load(target)["w"]), [1.0, 1.0])
