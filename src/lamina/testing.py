"""A public conformance check that any layer, a user's too, can be run through.

>>> import lamina as lm
>>> lm.set_backend("numpy"); report = lm.testing.check_layer(lm.Linear(3), (4, 5))
<lamina backend 'numpy'>
>>> report["output shape"]
'(4, 3)'
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import numpy as np

from . import ops
from .backends import available_backends, get_backend
from .module import Module

__all__ = ["check_layer", "LayerCheckError"]


class LayerCheckError(AssertionError):
    """A layer failed ``check_layer``; the message lists every failed check."""


def _flat(y) -> list:
    """The arrays of an output that may be a (nested) tuple, as (output, (h, c)) of an LSTM."""
    if isinstance(y, tuple | list):
        return [a for item in y for a in _flat(item)]
    return [y]


def _outputs_on_host(layer: Module, y) -> list:
    b = get_backend(layer.backend)
    return [np.asarray(b.to_numpy(a)) for a in _flat(y)]


def _same(a: list, b: list, rtol: float = 0.0, atol: float = 0.0) -> bool:
    return len(a) == len(b) and all(u.shape == v.shape and np.allclose(u, v, rtol=rtol, atol=atol, equal_nan=False)
                                    if rtol or atol else np.array_equal(u, v) for u, v in zip(a, b))


def _real_parts(y: np.ndarray) -> np.ndarray:
    return np.concatenate([y.real.ravel(), y.imag.ravel()]) if np.iscomplexobj(y) else y.ravel()


def check_layer(layer: Module, input_shape: tuple, *, output_shape: tuple | None = None,
                param_names: list[str] | None = None, input_fn: Callable | None = None,
                backends: list[str] | None = None, rtol: float = 1e-4, atol: float = 1e-5,
                seed: int = 0, verbose: bool = False) -> dict:
    """Run ``layer`` through the checks every layer must pass, and return a report ``{check: result}``.

    1. It builds for inputs of ``input_shape`` (``None`` axes become 2) and its output has
       ``output_shape`` (``None`` matches any size), when given.
    2. Its parameter names are dotted paths that ``get_parameter`` resolves, each parameter listed once,
       and equal ``param_names`` when given; ``state_dict`` holds them and the persistent buffers.
    3. A save/load round trip through a safetensors file restores its outputs exactly.
    4. One SGD step on a random linear loss changes every trainable parameter.
    5. Its gradients agree with central finite differences computed in float64 on the numpy backend
       (a few coordinates of each parameter).
    6. Its outputs agree on every installed backend (or ``backends``) within ``rtol``/``atol``.

    Checks 4 and 5 need a backend with autodiff (torch or jax) installed. The layer is used in eval mode
    and left as it was found: same backend, values and mode. ``input_fn(shape, rng) -> np.ndarray``
    makes the inputs (default: standard normal float32). Raises ``LayerCheckError`` listing every
    failed check.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(2 if s is None else s for s in input_shape)
    x = input_fn(shape, rng) if input_fn is not None else rng.standard_normal(shape).astype(np.float32)
    home = layer.backend
    modes = [(m, m.training) for m in layer.modules()]
    report: dict[str, str] = {}
    failures: list[str] = []

    def fail(check, msg):
        report[check] = "FAILED: " + msg
        failures.append(f"{check}: {msg}")

    folder = tempfile.mkdtemp(prefix="lamina-check-")
    saved = os.path.join(folder, "layer.safetensors")
    try:
        layer.eval()
        # 1. build and output shape
        layer.build(shape)
        y = _outputs_on_host(layer, layer(x))
        report["output shape"] = ", ".join(str(tuple(a.shape)) for a in y)
        first = y[0]
        if output_shape is not None and (len(output_shape) != first.ndim or any(
                o is not None and o != s for o, s in zip(output_shape, first.shape))):
            fail("output shape", f"declared {tuple(output_shape)}, got {tuple(first.shape)}")

        # 2. parameter names
        names = [k for k, _ in layer.named_parameters()]
        problems = [k for k, p in layer.named_parameters() if layer.get_parameter(k) is not p]
        if len(set(names)) != len(names) or problems:
            fail("parameter names", f"names that do not resolve to their parameter: {problems or names}")
        elif param_names is not None and sorted(param_names) != sorted(names):
            fail("parameter names", f"expected {sorted(param_names)}, got {sorted(names)}")
        else:
            report["parameter names"] = ", ".join(names) or "(none)"
        persistent = set(layer.state_dict())
        if set(layer.state_dict()) != persistent:
            fail("parameter names", f"state_dict keys {sorted(layer.state_dict())} != {sorted(persistent)}")

        # 3. save / load round trip
        from .checkpoint import load_into, save

        save(layer, saved, durable=False)
        for _, p in layer.named_parameters():
            if p.dtype.startswith(("float", "bfloat")):
                p.value = p.numpy() + 1.0
        load_into(layer, saved)
        y2 = _outputs_on_host(layer, layer(x))
        if not _same(y2, y):
            fail("save/load", "outputs changed after a save/load round trip")
        else:
            report["save/load"] = "outputs restored exactly"

        # 4 and 5 need autodiff: on the layer's backend if it has it, else on the first that does
        grad_backend = home if get_backend(home).has_autodiff else next(
            (b for b in available_backends() if get_backend(b).has_autodiff), None)
        trainable = [(k, p) for k, p in layer.named_parameters() if p.trainable]
        if grad_backend is None:
            report["training step"] = report["gradients"] = "skipped: no backend with autodiff installed"
        elif not trainable:
            report["training step"] = report["gradients"] = "no trainable parameters"
        else:
            layer.to(backend=grad_backend)
            b = get_backend(layer.backend)
            weights = rng.standard_normal(sum(_real_parts(a).size for a in y))
            w = b.from_numpy(weights.astype(np.float32))

            def loss(m, inp):
                xp = ops.namespace(w)
                parts = []
                for out in _flat(m(inp)):
                    flat = xp.reshape(out, (-1,))
                    if xp.isdtype(flat.dtype, "complex floating"):
                        flat = xp.concat([xp.real(flat), xp.imag(flat)])
                    parts.append(flat)
                return xp.sum(xp.concat(parts) * w)

            from .functional import value_and_grad

            _, grads = value_and_grad(loss)(layer, b.from_numpy(x))
            before = {k: p.numpy().copy() for k, p in trainable}
            for k, p in trainable:
                p.value = p.value - 0.1 * grads[k]
            unchanged = [k for k, p in trainable if np.array_equal(p.numpy(), before[k])]
            if unchanged:
                fail("training step", f"one SGD step left {unchanged} unchanged (zero gradient?)")
            else:
                report["training step"] = f"one SGD step changed {len(trainable)} trainable parameter(s)"
            load_into(layer, saved)

            # 5. finite differences in float64 on the numpy backend
            ad = {k: np.asarray(b.to_numpy(g), dtype=np.float64) for k, g in grads.items()}
            layer.to(backend="numpy")
            # row-major copies: element i of reshape(-1) is then a view of the value (a torch Linear weight is
            # column-major, and reshape would copy it)
            values = {k: np.array(p.numpy(), dtype=np.float64, order="C")
                      for k, p in [*layer.named_parameters(), *layer.named_buffers()]}
            x64 = x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x
            from .functional import functional_call

            def f(vals):
                outs = _flat(functional_call(layer, vals, x64))
                return float(np.concatenate([_real_parts(np.asarray(o)) for o in outs]) @ weights)

            bad = []
            for k, _ in trainable:
                flat = values[k].reshape(-1)
                for i in rng.choice(flat.size, size=min(6, flat.size), replace=False):
                    eps = 1e-6 * max(1.0, abs(flat[i]))
                    old = flat[i]
                    flat[i] = old + eps
                    up = f(values)
                    flat[i] = old - eps
                    down = f(values)
                    flat[i] = old
                    fd = (up - down) / (2 * eps)
                    got = ad[k].reshape(-1)[i]
                    if abs(got - fd) > 1e-3 * max(1.0, abs(fd)):
                        bad.append(f"{k}[{i}]: autodiff {got:.6g}, finite differences {fd:.6g}")
            if bad:
                fail("gradients", "; ".join(bad[:5]))
            else:
                report["gradients"] = f"match finite differences ({grad_backend} autodiff vs float64 numpy)"

        # 6. the same outputs on every backend
        others = [n for n in (backends or available_backends()) if n != home]
        agreed = []
        for other in others:
            layer.to(backend=other)
            yo = _outputs_on_host(layer, layer(x))
            if not _same(yo, y, rtol, atol):
                diffs = [f"{np.abs(u - v).max():.3g}" if u.shape == v.shape else f"shape {u.shape}"
                         for u, v in zip(yo, y)]
                fail("backends", f"{other} differs from {home} by {', '.join(diffs)}")
            else:
                agreed.append(other)
        report["backends"] = f"{home} agrees with {', '.join(agreed)}" if agreed else "only one backend installed"
    except Exception as e:  # any crash in a check is a failure of that layer, reported with the others
        fail("check_layer", f"{type(e).__name__}: {e}")
    finally:
        if layer.backend != home:
            layer.to(backend=home)
        if os.path.exists(saved):  # the values the layer came with, whatever happened
            try:
                load_into(layer, saved)
            except Exception as e:
                failures.append(f"check_layer: could not restore the layer's values: {e}")
        for m, mode in modes:
            m.training = mode
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
    if verbose:
        for k, v in report.items():
            print(f"  {k:<16} {v}")
    if failures:
        raise LayerCheckError(f"{type(layer).__name__} failed check_layer:\n  " + "\n  ".join(failures))
    return report
