"""Regression tests for stale answers from the caches and shortcuts of commit 935dad7 ("Less Python around a
user's own step") and from the build undo they rely on. Each result is compared with an independent reference
(torch.optim, NumPy, a fresh computation of the same question)."""

import numpy as np
import pytest

import lamina as lm

from conftest import GRAD_BACKENDS, rand


# ----- torch engine: "a gradient that is already the tensor's .grad is skipped" ----------------------------
@pytest.mark.skipif("torch" not in GRAD_BACKENDS, reason="torch not installed")
def test_a_strided_gradient_set_by_hand_on_a_row_major_parameter_gives_torch_optims_update():
    """``p.grad = g`` with ``g`` not laid out like the (row-major) parameter, then ``opt.step()``: Optimizer.step
    hands the engine ``{k: p.grad}``, so ``t.grad is g`` holds and the shortcut skipped the layout fix; torch's
    fused Adam (chosen for float32 on CPU) then misreads the gradient. Reference: torch.optim.Adam, not fused."""
    import torch

    lm.set_backend("torch")
    lm.manual_seed(0)

    class M(lm.Module):
        def __init__(self):
            super().__init__()
            self.w = lm.Parameter((6, 12))  # row-major (order "C")

        def forward(self, x):
            return x @ self.w

    m = M()
    p = m.get_parameter("w")
    assert p.value.is_contiguous()
    t = torch.nn.Parameter(torch.from_numpy(p.numpy().copy()))
    opt, ref = lm.optim.Adam(m, lr=0.1), torch.optim.Adam([t], lr=0.1, foreach=False)
    for seed in range(3):
        g = torch.from_numpy(rand(12, 6, seed=seed)).t()  # shape (6, 12), column-major memory
        p.grad = g
        opt.step()
        t.grad = g.clone()
        ref.step()
    np.testing.assert_allclose(p.numpy(), t.detach().numpy(), rtol=1e-6, atol=1e-6)


# ----- functional: "a value that is the parameter's own value is neither shown nor checked" -----------------
def _linear_and_inputs():
    model = lm.Linear(3, 2)
    x = rand(4, 3)
    own = model.state_dict()
    w, b = np.asarray(own["weight"]), np.asarray(own["bias"])
    return model, x, own, w, b


@pytest.mark.skipif("jax" not in GRAD_BACKENDS, reason="jax not installed")
@pytest.mark.parametrize("compile", [None, False])
def test_functional_call_with_the_models_own_arrays_inside_value_and_grad_uses_those_arrays(compile):
    """Inside ``fn`` the model shows the traced parameters; ``lm.functional_call(m, own, x)`` with ``own`` the
    model's stored arrays must compute with those concrete arrays (constants for the gradient), as it does
    outside. The shortcut ``value is p._value`` left the enclosing call's tracers in place: the gradient of
    ``sum(m(x) * ref)`` came out as if ``ref`` were ``m(x)`` (twice the reference)."""
    lm.set_backend("jax")
    lm.manual_seed(0)
    model, x, own, w, b = _linear_and_inputs()

    def fn(m, xb):
        out = m(xb)
        ref = lm.functional_call(m, own, xb)
        return (out * ref).sum()

    loss, grads = lm.value_and_grad(fn, compile=compile)(model, x)
    ref = x @ w + b
    np.testing.assert_allclose(float(loss), float((ref * ref).sum()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["weight"]), x.T @ ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["bias"]), ref.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("jax" not in GRAD_BACKENDS, reason="jax not installed")
def test_functional_call_nested_in_value_and_grad_gives_the_enclosing_values_back():
    """(Older than 935dad7.) A functional_call inside ``fn`` restores each parameter to its stored value on
    exit, not to what the enclosing pure call showed: ``m(x)`` after it runs on constants and its gradient is
    lost (zero here)."""
    lm.set_backend("jax")
    lm.manual_seed(0)
    model, x, own, w, b = _linear_and_inputs()
    half = {k: v * 0.5 for k, v in own.items()}

    def fn(m, xb):
        ref = lm.functional_call(m, half, xb)
        return (m(xb) * ref).sum()

    _, grads = lm.value_and_grad(fn, compile=False)(model, x)
    ref = x @ (w * 0.5) + b * 0.5
    np.testing.assert_allclose(np.asarray(grads["weight"]), x.T @ ref, rtol=1e-5, atol=1e-5)


# ----- build: the undo of a failed build, and is_built remembered per structure -----------------------------
def test_a_failed_build_hook_of_a_module_with_children_leaves_it_as_it_was():
    """(Older than 935dad7: build.undo_build's loop variable ``m`` shadows the module.) A build hook that raises
    on a module with children re-registered every child inside itself ("contains itself" on the next call)."""
    lm.set_backend("numpy")
    lm.manual_seed(0)

    class Outer(lm.Module):
        def __init__(self):
            super().__init__()
            self.inner = lm.Linear(4, 3)

        def build(self, input_shape):
            if input_shape[-1] != 4:
                raise ValueError("Outer takes 4 features")

        def forward(self, x):
            return self.inner(x)

    o = Outer()
    with pytest.raises(ValueError, match="4 features"):
        o(rand(2, 5))
    assert list(o.inner._modules) == [] and [k for k, _ in o.named_parameters()] == ["inner.weight", "inner.bias"]
    x = rand(2, 4)
    inner = o.inner
    np.testing.assert_allclose(o(x), x @ inner.get_parameter("weight").numpy() + inner.get_parameter("bias").numpy(),
                               rtol=1e-6)


def test_is_built_after_an_undone_build_matches_a_fresh_look_at_the_parameters():
    """A build that fails is undone by resetting parameter shapes (``p.shape = declared``) without a structure
    change, so an ``is_built`` remembered during the build stays True for a parameter that is lazy again."""
    lm.set_backend("numpy")

    class Inner(lm.Module):
        def __init__(self):
            super().__init__()
            self.w = lm.Parameter((None, 3))

        def build(self, input_shape):
            self.get_parameter("w").materialize((input_shape[-1], 3))

        def forward(self, x):
            return x @ self.w

    class Outer(lm.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()
            self.w = self.inner.get_parameter("w")  # tied

        def build(self, input_shape):
            self.inner.build(input_shape)  # builds the child (and asks whether it is built)
            raise ValueError("Outer's own check fails")

        def forward(self, x):
            return self.inner(x)

    o = Outer()
    with pytest.raises(ValueError, match="own check"):
        o(rand(2, 4))
    w = o.get_parameter("w")
    assert w.shape == (None, 3)  # the undo made it lazy again
    assert o.inner.is_built == w.is_built
