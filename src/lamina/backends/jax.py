"""The JAX backend. Parameters are plain ``jax.Array``s; a model runs as a pure function of its
``{path: array}`` dict (``lm.functional_call``) under ``jax.jit``, ``jax.grad`` and ``jax.vmap``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import BackendError, DeviceError
from .base import Backend, normalise_device

_ArrayImpl = type(jnp.zeros(()))  # the concrete (non-traced) array type


def _jax_device_name(d) -> str:
    platform = "cuda" if d.platform == "gpu" else d.platform
    return "cpu" if platform == "cpu" and d.id == 0 else f"{platform}:{d.id}"


class JaxBackend(Backend):
    name = "jax"
    array_name = "jax.Array"
    has_autodiff = True
    # A small model's step takes ~25 us on CPU, of which lamina's per-call bookkeeping would be a third;
    # fit runs 16 steps as one compiled program (lax.scan) so it is paid once per 16 steps.
    steps_per_call = 16

    def __init__(self):
        super().__init__()
        import array_api_compat

        self.xp = array_api_compat.array_namespace(jnp.zeros(()))
        self.native_types.add(_ArrayImpl)

    def is_native(self, x) -> bool:
        return isinstance(x, jax.Array)  # tracers under jit/grad/vmap are jax.Arrays too

    def dtype(self, name):
        try:
            return jnp.dtype(name)
        except TypeError as e:
            raise BackendError(f"the jax backend has no dtype {name!r}") from e

    def dtype_name(self, x):
        return str(x.dtype)

    def is_traced(self, x):
        return isinstance(x, jax.core.Tracer)

    def canonical_dtype(self, name):
        # without jax_enable_x64, 64-bit types are stored as 32-bit ones
        return str(jax.dtypes.canonicalize_dtype(jnp.dtype(name))) if name != "bfloat16" else name

    def from_numpy(self, a, device=None, copy=True):
        return jax.device_put(np.asarray(a), self._device(device))

    def _from_dlpack(self, x):
        return jnp.from_dlpack(x.detach() if hasattr(x, "detach") else x)

    def copy(self, x):
        return jnp.array(x, copy=True)

    # ----- devices -----------------------------------------------------------------------------------
    def devices(self):
        return [_jax_device_name(d) for d in jax.devices()] + (
            [] if jax.default_backend() == "cpu" else [_jax_device_name(d) for d in jax.devices("cpu")])

    def default_device(self):
        return _jax_device_name(jax.devices()[0])

    def device_of(self, x):
        try:
            return _jax_device_name(next(iter(x.devices())))
        except Exception:  # a tracer has no device
            return self.default_device()

    def _device(self, device):
        if device is None:
            return None
        device = normalise_device(device)
        for d in jax.devices() + (jax.devices("cpu") if jax.default_backend() != "cpu" else []):
            if _jax_device_name(d) == device:
                return d
        raise DeviceError(f"the jax backend has no device {device!r}; available: {self.devices()}")

    def to_device(self, x, device):
        return x if device is None else jax.device_put(x, self._device(device))

    # ----- autodiff ----------------------------------------------------------------------------------
    def value_and_grad(self, f, params, has_aux=False):
        return jax.value_and_grad(f, has_aux=has_aux)(params)

    # ----- training ----------------------------------------------------------------------------------
    def optimizer(self, kind, hyper):
        return _JaxOptimizer(self, kind, hyper)

    def train_step(self, model, loss_fn, optimizer, compile, outputs=True):
        """One ``jax.jit`` program per input shape: forward, gradient and optimizer update together, with
        the parameters and optimizer state donated so XLA updates them in place."""
        from .. import random
        from ..context import structure_version as _structure_version
        from ..functional import _swapped

        engine = optimizer.engine(self)

        def pure(params, bufs, consts, state, x, y, scalars, seed):
            def f(ps):
                swap = {**consts, **bufs, **{names_to_paths[k]: v for k, v in ps.items()}}
                with _swapped(model, swap) as writes, random.key_scope(jax.random.key(seed)) as scope:
                    out = model(x)
                if scope[1]:  # seen while tracing: this model draws random numbers, it needs a new seed per step
                    uses_keys[0] = True
                return loss_fn(out, y), (out, dict(writes))

            (loss, (out, writes)), grads = jax.value_and_grad(f, has_aux=True)(params)
            params, state = engine.update(grads, state, params, scalars)
            return params, {**bufs, **writes}, state, loss, (out if outputs else None)

        def many(params, bufs, consts, state, xs, ys, table, seeds):
            """Steps over the leading axis of xs, ys, table and seeds, as one program: the same update per step."""
            def body(carry, batch):
                p, b, s, loss, _ = pure(carry[0], carry[1], consts, carry[2], *batch)
                return (p, b, s), loss

            (params, bufs, state), losses = jax.lax.scan(body, (params, bufs, state), (xs, ys, table, seeds))
            return params, bufs, state, losses

        run = pure if compile is False else jax.jit(pure, donate_argnums=(0, 1, 3))
        run_many = None if compile is False else jax.jit(many, donate_argnums=(0, 1, 3))
        names_to_paths: dict = {}
        cache: dict = {}
        uses_keys = [None]  # None until the first trace tells whether any layer draws random numbers
        fixed = {None: jnp.zeros((), jnp.uint32)}  # for models without randomness: no host draw, no transfer

        def seeds(n=None):
            if uses_keys[0] is False:
                if n not in fixed:
                    fixed[n] = jnp.zeros((n,), jnp.uint32)
                return fixed[n]
            return np.uint32(random.next_seed()) if n is None else random.next_seeds(n)

        def layout():
            """Names, parameters, buffers and constants, recomputed only when the model's structure changed
            (a trainable flag flipping counts as a change)."""
            version = _structure_version()
            if cache.get("v") != version:
                index = model._index()
                entries = optimizer.entries()
                trainable = {id(p) for _, p in entries}
                paths = {id(p): path for path, p in index.entries}
                names_to_paths.clear()
                names_to_paths.update({k: paths.get(id(p), k) for k, p in entries})
                rest = [(path, p) for path, p in index.entries if id(p) not in trainable]
                cache.update(v=version, entries=entries, bufs=[(k, p) for k, p in rest if p._is_buffer],
                             consts=[(k, p) for k, p in rest if not p._is_buffer])
                engine.ensure({k: p.value for k, p in entries})
            return cache["entries"], cache["bufs"], cache["consts"]

        def show(pairs, values):
            for k, p in pairs:  # the new values replace the donated ones everywhere they are shown
                p.set_value(values[k], trusted=True)

        def arguments():
            entries, buf_entries, const_entries = layout()
            return (entries, buf_entries, {k: p._value for k, p in entries}, {k: p._value for k, p in buf_entries},
                    {k: p._value for k, p in const_entries})

        def step(x, y, lr):
            entries, buf_entries, params, bufs, consts = arguments()
            params, bufs, engine.state, loss, out = run(params, bufs, consts, engine.state, x, y,
                                                        engine.scalars(lr), seeds())
            if uses_keys[0] is None:
                uses_keys[0] = False  # traced (first call) and no layer set it: no randomness
            engine.count += 1
            show(entries, params)
            show(buf_entries, bufs)
            return loss, out

        def step_many(xs, ys, lrs):
            """len(lrs) steps on the stacked batches xs, ys (leading axis: the step); returns the losses."""
            entries, buf_entries, params, bufs, consts = arguments()
            table = np.stack([engine.scalars(lr, i) for i, lr in enumerate(lrs)])
            params, bufs, engine.state, losses = run_many(params, bufs, consts, engine.state, xs, ys, table,
                                                          seeds(len(lrs)))
            if uses_keys[0] is None:
                uses_keys[0] = False
            engine.count += len(lrs)
            show(entries, params)
            show(buf_entries, bufs)
            return losses

        step.compiled = run  # exposed so tests can count compilations
        step.many = None if run_many is None else step_many
        return step

    # ----- native ops --------------------------------------------------------------------------------
    # Eager jax.nn.relu costs ~100 us (custom_jvp dispatch) against ~9 us for jnp.maximum, but
    # maximum's gradient at 0 is 0.5 where torch's and jax.nn.relu's is 0. Only traced arrays can be
    # differentiated, so concrete arrays take the fast path and tracers get jax.nn's gradient.
    def relu(self, x):
        if type(x) is _ArrayImpl:
            return jnp.maximum(x, 0)
        return jax.nn.relu(x)

    def leaky_relu(self, x, negative_slope=0.01):
        return jax.nn.leaky_relu(x, negative_slope)

    def sigmoid(self, x):
        return jax.nn.sigmoid(x)

    def tanh(self, x):
        return jnp.tanh(x)

    def gelu(self, x, approximate=False):
        return jax.nn.gelu(x, approximate=approximate)

    def softmax(self, x, axis=-1):
        return jax.nn.softmax(x, axis=axis)

    def log_softmax(self, x, axis=-1):
        return jax.nn.log_softmax(x, axis=axis)

    def logsumexp(self, x, axis=-1, keepdims=False):
        return jax.nn.logsumexp(x, axis=axis, keepdims=keepdims)

    einsum = staticmethod(jnp.einsum)

    def linear(self, x, weight, bias=None):
        y = x @ weight
        return y if bias is None else y + bias

    def rfft(self, x):
        return jnp.fft.rfft(x)

    def conv(self, x, w, b, stride, padding, dilation, groups):
        nd = len(stride)
        spec = ("NCH", "OIH", "NCH") if nd == 1 else ("NCHW", "OIHW", "NCHW") if nd == 2 else (
            "NCDHW", "OIDHW", "NCDHW")
        y = jax.lax.conv_general_dilated(x, w, stride, list(padding), rhs_dilation=dilation,
                                         dimension_numbers=spec, feature_group_count=groups)
        return y if b is None else y + b.reshape(1, -1, *([1] * nd))

    def pool(self, x, kind, window, stride, padding):
        dims, strides, pads = (1, 1, *window), (1, 1, *stride), ((0, 0), (0, 0), *padding)
        if kind == "max":
            return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, pads)
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pads) / float(np.prod(window))

    def embedding(self, weight, indices):
        # jax clamps out-of-range indices silently; NaN rows make the mistake visible instead
        return jnp.take(weight, indices, axis=0, mode="fill", fill_value=jnp.nan)

    def stop_gradient(self, x):
        return jax.lax.stop_gradient(x)

    def scan(self, fn, carry, xs):
        return jax.lax.scan(fn, carry, xs)

    def attention(self, q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask)

    def fold_key(self, key, i):
        return jax.random.fold_in(key, i)

    def dropout(self, x, rate, training=True, key=None):
        if not training or rate == 0.0:
            return x
        if key is None:
            raise BackendError(
                "dropout on the jax backend needs a random key: pass key=jax.random.key(...) "
                "(jax has no hidden global random state); the Dropout layer finds its own"
            )
        if not isinstance(key, jax.Array):
            key = jax.random.key(key)
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class _JaxOptimizer:
    """lamina.optim on jax: torch.optim's update rules, written with jax.numpy in torch's order of
    operations, so that both backends follow the same trajectory (checked within 1e-6 over 100 steps).
    optax was tried first and drifted by up to 3e-6 over 100 steps (its Adam and AdamW group the same
    arithmetic differently). Like torch, the per-step scalars (learning rate, bias corrections) are
    computed in double precision in Python and rounded once to float32; they enter the compiled step as
    data, so a schedule never recompiles it. State names match torch's (``{name}/exp_avg``, ...), so an
    optimizer state saved on one backend loads on the other."""

    def __init__(self, backend, kind, hyper):
        self.backend, self.kind, self.h = backend, kind, hyper
        self.state = None
        self.names: list = []
        self.count = 0  # updates done, mirrored on the host to build the scalars without a device sync
        self._eager_update = jax.jit(self.update)

    def ensure(self, params):
        if self.state is None or list(params) != self.names:
            slots = (["momentum_buffer"] if self.h.get("momentum") else []) if self.kind == "sgd" else [
                "exp_avg", "exp_avg_sq"]
            self.state = {slot: {k: jnp.zeros_like(v) for k, v in params.items()} for slot in slots}
            self.names = list(params)
            self.count = 0

    _SCALARS = ("lr", "step_size", "bc2_sqrt", "decay")

    def scalars(self, lr, ahead: int = 0):
        """The per-step scalars as one float32 NumPy vector: a single cheap argument for the compiled
        step (four jnp scalars cost ~270 us per step to build, measured; this costs ~1 us)."""
        t = self.count + 1 + ahead
        if self.kind == "sgd":
            return np.array([lr, 0.0, 0.0, 0.0], np.float32)
        b1, b2 = self.h["betas"]
        return np.array([lr, lr / (1 - b1**t), (1 - b2**t) ** 0.5, 1 - lr * self.h["weight_decay"]], np.float32)

    def update(self, grads, state, params, vector):
        s = dict(zip(self._SCALARS, (vector[i] for i in range(4))))
        h, new_params = self.h, {}
        new_state = {slot: {} for slot in state}
        wd = h["weight_decay"]
        for k, p in params.items():
            g = grads[k]
            if self.kind == "sgd":
                if wd:
                    g = g + wd * p
                if "momentum_buffer" in state:  # the first buffer is g itself: 0 * m + g
                    m = h["momentum"]
                    buf = state["momentum_buffer"][k] * m + g
                    new_state["momentum_buffer"][k] = buf
                    g = g + m * buf if h["nesterov"] else buf
                new_params[k] = p + (-s["lr"]) * g
                continue
            b1, b2 = h["betas"]
            if self.kind == "adamw":
                p = p * s["decay"]
            elif wd:
                g = g + wd * p
            m = state["exp_avg"][k]
            m = m + (1 - b1) * (g - m)  # torch.lerp for weights below 0.5
            v = state["exp_avg_sq"][k] * b2 + (1 - b2) * (g * g)
            denom = jnp.sqrt(v) / s["bc2_sqrt"] + h["eps"]
            new_params[k] = p + (-s["step_size"]) * (m / denom)
            new_state["exp_avg"][k], new_state["exp_avg_sq"][k] = m, v
        return new_params, new_state

    def step(self, entries, grads, lr):
        params = {k: p.value for k, p in entries}
        self.ensure(params)
        new, self.state = self._eager_update({k: grads[k] for k in params}, self.state, params, self.scalars(lr))
        self.count += 1
        for k, p in entries:
            p._set_value(new[k])

    def state_dict(self, entries):
        self.ensure({k: p.value for k, p in entries})
        out = {}
        for k in self.names:
            out[f"{k}/step"] = jnp.float32(self.count)
            for slot, arrays in self.state.items():
                out[f"{k}/{slot}"] = arrays[k]
        return out

    def load_state_dict(self, entries, arrays):
        params = {k: p.value for k, p in entries}
        self.ensure(params)
        expected = {f"{k}/{slot}" for k in self.names for slot in [*self.state, "step"]}
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        if missing or extra:
            raise ValueError(f"optimizer state does not fit this optimizer: missing {missing}, unexpected {extra}")
        host = {k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for k, v in arrays.items()}
        self.state = {slot: {k: jnp.asarray(host[f"{k}/{slot}"], dtype=params[k].dtype) for k in self.names}
                      for slot in self.state}
        self.count = int(host[f"{self.names[0]}/step"]) if self.names else 0
