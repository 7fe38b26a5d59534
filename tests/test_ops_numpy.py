"""lm.ops' array namespace (ops/numpy.py) on every backend, against NumPy; gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest

import lamina as lm

from conftest import BACKENDS, numeric_grad, rand, to_np

ops = lm.ops
R = np.random.default_rng(1)
A = rand(3, 4)                                              # generic float32 matrix
B = rand(3, 4, seed=2)
V = rand(4, seed=3)                                         # broadcasts against A
POS = (np.abs(rand(3, 4, seed=4)) + 0.5).astype(np.float32)  # positive, away from 0
UNIT = np.tanh(rand(3, 4, seed=5)).astype(np.float32) * 0.9  # in (-0.9, 0.9)
BIG = (POS + 1.0).astype(np.float32)                        # > 1
SPECIAL = np.array([1.0, np.inf, -np.inf, np.nan, -0.0, 2.5], np.float32)
HALVES = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.7, -1.2], np.float32)
INT = np.array([[5, -3, 7, 0], [2, 9, -8, 4]], np.int64)
INT2 = np.array([[2, 3, -3, 1], [5, 2, 3, -7]], np.int64)
SHIFT = np.array([[0, 1, 2, 3], [1, 1, 0, 2]], np.int64)
BOOL = np.array([[True, False, True, False], [False, False, True, True]])
BOOL2 = np.array([[True, True, False, False], [False, True, False, True]])
CPLX = np.array([1 + 2j, -3 - 1j, 0.5j], np.complex64)
TIES = np.array([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
T3 = rand(2, 3, 4, seed=6)


@pytest.fixture(autouse=True)
def _array_api_backends_only(request):
    """lm.ops' array namespace dispatches through each adapter's Array-API namespace (``backend.xp``). A backend
    whose adapter offers a namespace that is not one (no ``__array_api_version__``: tensorflow's
    ``tf.experimental.numpy`` today) is skipped until its adapter gains an Array-API shim."""
    name = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if name is not None and not hasattr(lm.get_backend(name).xp, "__array_api_version__"):
        pytest.skip(f"the {name} adapter's namespace is not an Array API namespace")


def case(name, fn, ref, *inputs, grad=False, tol=1e-5):
    """``fn(*backend inputs)`` against ``ref(*numpy inputs)``; NumPy arrays in ``inputs`` are converted,
    everything else is passed as it is. ``grad``: also check d/d(first input) against finite differences."""
    return pytest.param(fn, ref, inputs, grad, tol, id=name)


def sort_ref(x, axis=-1):
    return np.sort(x, axis=axis, kind="stable")


def topk_ref(x, k=2):  # largest first; on ties the lower index first
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, idx, axis=-1), idx


UNARY = {  # name: (numpy reference, input, differentiable)
    "abs": (np.abs, A, True), "acos": (np.arccos, UNIT, True), "acosh": (np.arccosh, BIG, True),
    "asin": (np.arcsin, UNIT, True), "asinh": (np.arcsinh, A, True), "atan": (np.arctan, A, True),
    "atanh": (np.arctanh, UNIT, True), "ceil": (np.ceil, HALVES, False), "cos": (np.cos, A, True),
    "cosh": (np.cosh, A, True), "exp": (np.exp, A, True), "expm1": (np.expm1, A, True),
    "floor": (np.floor, HALVES, False), "isfinite": (np.isfinite, SPECIAL, False),
    "isinf": (np.isinf, SPECIAL, False), "isnan": (np.isnan, SPECIAL, False), "log": (np.log, POS, True),
    "log1p": (np.log1p, POS, True), "log2": (np.log2, POS, True), "log10": (np.log10, POS, True),
    "negative": (np.negative, A, True), "positive": (np.positive, A, True),
    "reciprocal": (np.reciprocal, POS, True), "round": (np.round, HALVES, False), "sign": (np.sign, A, False),
    "signbit": (np.signbit, SPECIAL[[0, 1, 2, 4]], False), "sin": (np.sin, A, True), "sinh": (np.sinh, A, True),
    "square": (np.square, A, True), "sqrt": (np.sqrt, POS, True), "tan": (np.tan, UNIT, True),
    "trunc": (np.trunc, HALVES, False), "logical_not": (np.logical_not, BOOL, False),
    "bitwise_invert": (np.invert, INT, False), "conj": (np.conj, CPLX, False), "real": (np.real, CPLX, False),
    "imag": (np.imag, CPLX, False),
}

BINARY = {  # name: (numpy reference, x1, x2, differentiable in x1)
    "add": (np.add, A, V, True), "subtract": (np.subtract, A, V, True), "multiply": (np.multiply, A, B, True),
    "divide": (np.divide, A, POS, True), "floor_divide": (np.floor_divide, INT, INT2, False),
    "remainder": (np.remainder, INT, INT2, False), "remainder_float": (np.remainder, A * 5, POS, False),
    "pow": (np.power, POS, A, True), "equal": (np.equal, INT, INT2 + 3, False),
    "not_equal": (np.not_equal, INT, INT2 + 3, False), "less": (np.less, A, B, False),
    "less_equal": (np.less_equal, INT, INT2, False), "greater": (np.greater, A, B, False),
    "greater_equal": (np.greater_equal, INT, INT2, False), "atan2": (np.arctan2, A, B, True),
    "bitwise_and": (np.bitwise_and, INT, INT2, False), "bitwise_or": (np.bitwise_or, INT, INT2, False),
    "bitwise_xor": (np.bitwise_xor, INT, INT2, False), "bitwise_left_shift": (np.left_shift, INT, SHIFT, False),
    "bitwise_right_shift": (np.right_shift, INT, SHIFT, False), "copysign": (np.copysign, POS, A, True),
    "hypot": (np.hypot, A, B, True), "logaddexp": (np.logaddexp, A, B, True),
    "logical_and": (np.logical_and, BOOL, BOOL2, False), "logical_or": (np.logical_or, BOOL, BOOL2, False),
    "logical_xor": (np.logical_xor, BOOL, BOOL2, False), "maximum": (np.maximum, A, B, True),
    "minimum": (np.minimum, A, B, True),
}

CASES = [
    *[case(n, getattr(ops, n), ref, x, grad=g) for n, (ref, x, g) in UNARY.items()],
    *[case(n, getattr(ops, n.removesuffix("_float")), ref, x1, x2, grad=g) for n, (ref, x1, x2, g) in BINARY.items()],
    case("add_scalar", lambda x: ops.add(x, 2.0), lambda x: x + 2.0, A, grad=True),
    case("maximum_scalar", lambda x: ops.maximum(x, 0.0), lambda x: np.maximum(x, 0.0), A, grad=True),
    case("pow_scalar_base", lambda x: ops.pow(2.0, x), lambda x: 2.0**x, A, grad=True),
    # creation (dtype and values; placement is tested separately)
    case("arange", lambda x: ops.arange(2, 11, 3, like=x), lambda x: np.arange(2, 11, 3), A),
    case("arange_float", lambda x: ops.arange(0.0, 1.0, 0.25, like=x), lambda x: np.arange(0, 1, 0.25, np.float32), A),
    case("zeros", lambda x: ops.zeros((2, 3), like=x), lambda x: np.zeros((2, 3), np.float32), A),
    case("ones_int_shape", lambda x: ops.ones(3, like=x), lambda x: np.ones(3, np.float32), A),
    case("empty_shape", lambda x: ops.shape(ops.empty((2, 5), like=x)), lambda x: (2, 5), A),
    case("full", lambda x: ops.full((2, 2), 1.5, like=x), lambda x: np.full((2, 2), 1.5, np.float32), A),
    case("full_bool", lambda x: ops.full((2,), True, like=x), lambda x: np.array([True, True]), A),
    case("eye", lambda x: ops.eye(3, 4, k=1, like=x), lambda x: np.eye(3, 4, k=1, dtype=np.float32), A),
    case("linspace", lambda x: ops.linspace(0, 1, 5, like=x), lambda x: np.linspace(0, 1, 5, dtype=np.float32), A),
    case("linspace_open", lambda x: ops.linspace(0, 1, 4, endpoint=False, like=x),
         lambda x: np.linspace(0, 1, 4, endpoint=False, dtype=np.float32), A),
    case("zeros_like", ops.zeros_like, np.zeros_like, A),
    case("ones_like_int", lambda x: ops.ones_like(x, dtype="int32"), lambda x: np.ones_like(x, np.int32), A),
    case("empty_like_shape", lambda x: ops.shape(ops.empty_like(x)), lambda x: x.shape, A),
    case("full_like", lambda x: ops.full_like(x, 7.0), lambda x: np.full_like(x, 7.0), A),
    case("tril", lambda x: ops.tril(x, k=-1), lambda x: np.tril(x, -1), A, grad=True),
    case("triu", lambda x: ops.triu(x, k=1), lambda x: np.triu(x, 1), T3, grad=True),
    case("meshgrid_xy", lambda a, b: ops.meshgrid(a, b), lambda a, b: np.meshgrid(a, b), V, A[0, :3]),
    case("meshgrid_ij", lambda a, b: ops.meshgrid(a, b, indexing="ij"),
         lambda a, b: np.meshgrid(a, b, indexing="ij"), V, A[0, :3]),
    case("one_hot", lambda i: ops.one_hot(i, 4), lambda i: np.eye(4, dtype=np.float32)[i], np.array([[0, 3], [2, 1]])),
    case("one_hot_out_of_range", lambda i: ops.one_hot(i, 3), lambda i: np.array([[0, 1, 0], [0, 0, 0]], np.float32),
         np.array([1, 5])),
    case("one_hot_axis0_int", lambda i: ops.one_hot(i, 3, axis=0, dtype="int32"),
         lambda i: np.eye(3, dtype=np.int32)[i].T, np.array([2, 0, 1, 1])),
    case("sequence_mask", lambda n: ops.sequence_mask(n, 5), lambda n: np.arange(5) < n[..., None],
         np.array([0, 2, 5])),
    case("sequence_mask_default", ops.sequence_mask, lambda n: np.arange(4) < n[..., None],
         np.array([[1, 4], [3, 2]])),
    # dtypes and shapes
    case("astype_name", lambda x: ops.astype(x, "int32"), lambda x: x.astype(np.int32), HALVES),
    case("astype_float16", lambda x: ops.astype(x, "float16"), lambda x: x.astype(np.float16), A),
    case("astype_pytype", lambda x: ops.astype(x, bool), lambda x: x.astype(bool), A),
    case("shape", ops.shape, np.shape, T3),
    case("ndim", ops.ndim, np.ndim, T3),
    case("size", ops.size, np.size, T3),
    case("to_numpy", ops.to_numpy, np.asarray, A),
    # element-wise with several operands
    case("clip", lambda x: ops.clip(x, -0.5, 0.5), lambda x: np.clip(x, -0.5, 0.5), A, grad=True),
    case("clip_min_only", lambda x: ops.clip(x, min=0.1), lambda x: np.clip(x, 0.1, None), A, grad=True),
    case("clip_max_only", lambda x: ops.clip(x, max=0.1), lambda x: np.clip(x, None, 0.1), A),
    case("where", ops.where, np.where, A > 0, A, B),
    case("where_grad", lambda x, c, y: ops.where(c, x, y), lambda x, c, y: np.where(c, x, y), A, A > 0, B, grad=True),
    case("where_scalar", lambda c, x: ops.where(c, x, 0.0), lambda c, x: np.where(c, x, np.float32(0)), A > 0, A),
    case("masked_fill", lambda x, m: ops.masked_fill(x, m, -1e9), lambda x, m: np.where(m, np.float32(-1e9), x),
         A, A > 0, grad=True),
    case("masked_fill_broadcast", lambda x, m: ops.masked_fill(x, m, 0.0),
         lambda x, m: np.where(m, 0, x), rand(2, 3, 4, 5), np.array([[[[True, False, True, False, False]]]] * 2),
         grad=True),
    case("masked_fill_keeps_int_dtype", lambda x, m: ops.masked_fill(x, m, 2.7),
         lambda x, m: np.where(m, np.int64(2), x), INT, BOOL),
    case("masked_fill_array_value", lambda x, m, v: ops.masked_fill(x, m, v),
         lambda x, m, v: np.where(m, v, x), A, BOOL[:1].repeat(3, 0), V),
    # indexing
    case("take", lambda x, i: ops.take(x, i, axis=1), lambda x, i: np.take(x, i, axis=1), A, np.array([3, 0, 0]),
         grad=True),
    case("take_negative_axis", lambda x, i: ops.take(x, i, axis=-1), lambda x, i: np.take(x, i, axis=-1),
         T3, np.array([1, 2])),
    case("take_flat", lambda x, i: ops.take(x, i), lambda x, i: np.take(x, i), A, np.array([11, 0, 5])),
    case("take_2d_indices", lambda x, i: ops.take(x, i, axis=0), lambda x, i: np.take(x, i, axis=0),
         A, np.array([[0, 2], [1, 1]]), grad=True),
    case("take_list", lambda x: ops.take(x, [1, 0], axis=0), lambda x: np.take(x, [1, 0], axis=0), A),
    case("take_along_axis", lambda x, i: ops.take_along_axis(x, i, axis=1),
         lambda x, i: np.take_along_axis(x, i, axis=1), A, np.array([[0], [3], [2]]), grad=True),
    # linear algebra
    case("matmul", ops.matmul, np.matmul, A, B.T, grad=True),
    case("matmul_batched", ops.matmul, np.matmul, T3, rand(4, 2), grad=True),
    case("matmul_vector", ops.matmul, np.matmul, V, V, grad=True),
    case("matrix_transpose", ops.matrix_transpose, lambda x: np.swapaxes(x, -1, -2), T3, grad=True),
    case("tensordot", lambda x, y: ops.tensordot(x, y, axes=1), lambda x, y: np.tensordot(x, y, 1), A, B.T, grad=True),
    case("tensordot_pairs", lambda x, y: ops.tensordot(x, y, axes=([1, 2], [0, 1])),
         lambda x, y: np.tensordot(x, y, ([1, 2], [0, 1])), T3, rand(3, 4, 2), grad=True),
    case("vecdot", ops.vecdot, lambda x, y: np.sum(x * y, -1), A, B, grad=True),
    case("outer", ops.outer, np.outer, V, A[0], grad=True),
    case("vector_norm", ops.vector_norm, np.linalg.norm, A, grad=True),
    case("vector_norm_axis_l1", lambda x: ops.vector_norm(x, axis=-1, ord=1, keepdims=True),
         lambda x: np.abs(x).sum(-1, keepdims=True), A, grad=True),
    # manipulation
    case("broadcast_arrays", lambda x, y: ops.broadcast_arrays(x, y), np.broadcast_arrays, A, V),
    case("broadcast_to", lambda x: ops.broadcast_to(x, (2, 3, 4)), lambda x: np.broadcast_to(x, (2, 3, 4)), V,
         grad=True),
    case("concat", lambda x, y: ops.concat([x, y], axis=-1), lambda x, y: np.concatenate([x, y], -1), A, B, grad=True),
    case("concat_none", lambda x, y: ops.concat((x, y), axis=None), lambda x, y: np.concatenate([x, y], None), A, V),
    case("stack", lambda x, y: ops.stack([x, y], axis=-1), lambda x, y: np.stack([x, y], -1), A, B, grad=True),
    case("unstack", lambda x: ops.unstack(x, axis=1), lambda x: [x[:, i] for i in range(4)], A, grad=True),
    case("expand_dims", lambda x: ops.expand_dims(x, -1), lambda x: x[..., None], A, grad=True),
    case("expand_dims_tuple", lambda x: ops.expand_dims(x, (0, -1)), lambda x: np.expand_dims(x, (0, -1)), A),
    case("squeeze", lambda x: ops.squeeze(x, 1), lambda x: np.squeeze(x, 1), A[:, None], grad=True),
    case("squeeze_all", ops.squeeze, np.squeeze, A[None, :, None]),
    case("squeeze_negative", lambda x: ops.squeeze(x, (-1, 0)), lambda x: np.squeeze(x, (-1, 0)), A[None, :, :, None]),
    case("flip", lambda x: ops.flip(x, axis=1), lambda x: np.flip(x, 1), A, grad=True),
    case("flip_negative_axis", lambda x: ops.flip(x, axis=-1), lambda x: x[..., ::-1], T3, grad=True),
    case("flip_all", ops.flip, np.flip, T3),
    case("flip_then_ops", lambda x: ops.flip(x, axis=0) @ x, lambda x: x[::-1] @ x, A[:, :3], grad=True),
    case("roll", lambda x: ops.roll(x, 2, axis=-1), lambda x: np.roll(x, 2, -1), A, grad=True),
    case("roll_flat", lambda x: ops.roll(x, -1), lambda x: np.roll(x, -1), A),
    case("permute_dims", lambda x: ops.permute_dims(x, (2, 0, 1)), lambda x: x.transpose(2, 0, 1), T3, grad=True),
    case("transpose_default", ops.transpose, np.transpose, T3),
    case("transpose_axes", lambda x: ops.transpose(x, [1, 0, 2]), lambda x: x.transpose(1, 0, 2), T3),
    case("swapaxes", lambda x: ops.swapaxes(x, 0, -1), lambda x: np.swapaxes(x, 0, -1), T3, grad=True),
    case("moveaxis", lambda x: ops.moveaxis(x, 0, -1), lambda x: np.moveaxis(x, 0, -1), T3, grad=True),
    case("reshape", lambda x: ops.reshape(x, (4, -1)), lambda x: x.reshape(4, -1), A, grad=True),
    case("reshape_list", lambda x: ops.reshape(x, [2, 6]), lambda x: x.reshape(2, 6), A),
    case("repeat", lambda x: ops.repeat(x, 2, axis=0), lambda x: np.repeat(x, 2, 0), A, grad=True),
    case("repeat_flat", lambda x: ops.repeat(x, 2), lambda x: np.repeat(x, 2), A),
    case("repeat_counts", lambda x, r: ops.repeat(x, r, axis=-1), lambda x, r: np.repeat(x, r, -1), A,
         np.array([0, 1, 2, 3])),
    case("tile", lambda x: ops.tile(x, (2, 1, 3)), lambda x: np.tile(x, (2, 1, 3)), A, grad=True),
    case("tile_int", lambda x: ops.tile(x, 2), lambda x: np.tile(x, 2), V),
    case("split_sections", lambda x: ops.split(x, 2, axis=1), lambda x: np.split(x, 2, 1), A, grad=True),
    case("split_indices", lambda x: ops.split(x, [1, 3], axis=-1), lambda x: np.split(x, [1, 3], -1), A, grad=True),
    case("split_indices_past_end", lambda x: ops.split(x, [2, 9]), lambda x: np.split(x, [2, 9]), V),
    case("pad_constant", lambda x: ops.pad(x, ((1, 0), (2, 3))), lambda x: np.pad(x, ((1, 0), (2, 3))), A, grad=True),
    case("pad_int_value", lambda x: ops.pad(x, 1, constant_values=-2.0),
         lambda x: np.pad(x, 1, constant_values=-2.0), A),
    case("pad_pair", lambda x: ops.pad(x, (0, 2)), lambda x: np.pad(x, (0, 2)), T3),
    case("pad_edge", lambda x: ops.pad(x, ((0, 0), (3, 2)), mode="edge"), lambda x: np.pad(x, ((0, 0), (3, 2)), "edge"),
         A, grad=True),
    case("pad_reflect", lambda x: ops.pad(x, ((2, 1), (3, 3)), mode="reflect"),
         lambda x: np.pad(x, ((2, 1), (3, 3)), "reflect"), A, grad=True),
    case("pad_symmetric", lambda x: ops.pad(x, 2, mode="symmetric"), lambda x: np.pad(x, 2, "symmetric"), A, grad=True),
    # searching
    case("argmax", lambda x: ops.argmax(x, axis=1), lambda x: np.argmax(x, 1), A),
    case("argmax_ties_first", lambda x: ops.argmax(x, axis=-1), lambda x: np.argmax(x, -1), TIES),
    case("argmax_flat", ops.argmax, np.argmax, A),
    case("argmin_keepdims", lambda x: ops.argmin(x, axis=0, keepdims=True),
         lambda x: np.argmin(x, 0, keepdims=True), A),
    case("count_nonzero", lambda x: ops.count_nonzero(x, axis=0), lambda x: np.count_nonzero(x, 0), INT),
    case("nonzero", ops.nonzero, np.nonzero, INT),
    case("searchsorted", ops.searchsorted, np.searchsorted, np.array([1.0, 2.0, 2.0, 5.0], np.float32),
         np.array([0.0, 2.0, 3.0, 9.0], np.float32)),
    case("searchsorted_right", lambda a, v: ops.searchsorted(a, v, side="right"),
         lambda a, v: np.searchsorted(a, v, "right"), np.array([1.0, 2.0, 2.0, 5.0], np.float32),
         np.array([0.0, 2.0, 3.0, 9.0], np.float32)),
    # sets
    case("unique_values", ops.unique_values, np.unique, np.array([3, 1, 3, 2, 1])),
    case("unique_counts", lambda x: tuple(ops.unique_counts(x)), lambda x: np.unique(x, return_counts=True),
         np.array([3, 1, 3, 2, 1])),
    case("unique_inverse", lambda x: tuple(ops.unique_inverse(x)), lambda x: np.unique(x, return_inverse=True),
         np.array([3, 1, 3, 2, 1])),
    case("unique_all", lambda x: tuple(ops.unique_all(x)),
         lambda x: np.unique(x, return_index=True, return_inverse=True, return_counts=True),
         np.array([[3, 1, 3], [2, 1, 4]])),
    # sorting
    case("sort", ops.sort, sort_ref, A, grad=True),
    case("sort_axis0_descending", lambda x: ops.sort(x, axis=0, descending=True), lambda x: -np.sort(-x, 0), A),
    case("argsort", lambda x: ops.argsort(x, axis=0), lambda x: np.argsort(x, 0, kind="stable"), A),
    case("argsort_ties_stable", ops.argsort, lambda x: np.argsort(x, -1, kind="stable"), TIES),
    case("argsort_descending_ties", lambda x: ops.argsort(x, descending=True),
         lambda x: np.argsort(-x, -1, kind="stable"), TIES),
    case("top_k", lambda x: ops.top_k(x, 2), topk_ref, A, grad=True),
    case("top_k_ties", lambda x: ops.top_k(x, 3), lambda x: topk_ref(x, 3), TIES),
    case("top_k_axis0", lambda x: ops.top_k(x, 2, axis=0), lambda x: tuple(np.swapaxes(r, 0, -1) for r in topk_ref(
        np.swapaxes(x, 0, -1), 2)), A),
    # statistics
    case("sum", ops.sum, np.sum, A, grad=True),
    case("sum_axis_keepdims", lambda x: ops.sum(x, axis=(0, -1), keepdims=True),
         lambda x: np.sum(x, (0, -1), keepdims=True), T3, grad=True),
    case("sum_int_dtype", lambda x: ops.sum(x, axis=1, dtype="int32"), lambda x: np.sum(x, 1, dtype=np.int32), INT),
    case("prod", lambda x: ops.prod(x, axis=-1), lambda x: np.prod(x, -1), A, grad=True),
    case("mean", lambda x: ops.mean(x, axis=-1), lambda x: np.mean(x, -1), A, grad=True),
    case("mean_all", ops.mean, np.mean, T3, grad=True),
    case("max", lambda x: ops.max(x, axis=0), lambda x: np.max(x, 0), A, grad=True),
    case("max_all", ops.max, np.max, A),
    case("min_keepdims", lambda x: ops.min(x, axis=-1, keepdims=True), lambda x: np.min(x, -1, keepdims=True), A,
         grad=True),
    case("var", lambda x: ops.var(x, axis=1), lambda x: np.var(x, 1), A, grad=True),
    case("var_unbiased", lambda x: ops.var(x, correction=1), lambda x: np.var(x, ddof=1), A, grad=True),
    case("std", lambda x: ops.std(x, axis=0, keepdims=True), lambda x: np.std(x, 0, keepdims=True), A, grad=True),
    case("cumulative_sum", lambda x: ops.cumulative_sum(x, axis=1), lambda x: np.cumsum(x, 1), A, grad=True),
    case("cumulative_sum_initial", lambda x: ops.cumulative_sum(x, axis=0, include_initial=True),
         lambda x: np.concatenate([np.zeros((1, 4), np.float32), np.cumsum(x, 0)]), A),
    case("cumulative_prod", lambda x: ops.cumulative_prod(x, axis=-1), lambda x: np.cumprod(x, -1), A, grad=True),
    case("cumsum_flat", ops.cumsum, np.cumsum, A, grad=True),
    case("cumsum_negative_axis", lambda x: ops.cumsum(x, axis=-2), lambda x: np.cumsum(x, -2), T3),
    case("cumprod", lambda x: ops.cumprod(x, 0), lambda x: np.cumprod(x, 0), A, grad=True),
    # utilities
    case("all", lambda x: ops.all(x, axis=1), lambda x: np.all(x, 1), BOOL),
    case("all_flat", ops.all, np.all, INT),
    case("any", lambda x: ops.any(x, axis=0, keepdims=True), lambda x: np.any(x, 0, keepdims=True), BOOL),
    case("diff", ops.diff, lambda x: np.diff(x), A, grad=True),
    case("diff_n2_axis0", lambda x: ops.diff(x, axis=0, n=2), lambda x: np.diff(x, 2, 0), A),
]


def to_backend(backend, v):
    return lm.get_backend(backend).from_numpy(v) if isinstance(v, np.ndarray) else v


def assert_same(got, want, tol):
    if isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), (got, want)
        for g, w in zip(got, want):
            assert_same(g, w, tol)
        return
    if isinstance(want, (int, float)) and not isinstance(want, bool) and not isinstance(got, (int, float)):
        assert lm.backend_of(got) is not None
    g, w = to_np(got), np.asarray(want)
    assert g.shape == w.shape, (g.shape, w.shape)
    if w.dtype.kind in "fc":
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    else:
        assert g.dtype.kind == w.dtype.kind, (g.dtype, w.dtype)
        np.testing.assert_array_equal(g, w)


def _jax_int(want):
    """jax without x64 stores 64-bit integers as 32-bit ones: compare int64 references as int32."""
    if isinstance(want, (tuple, list)):
        return type(want)(_jax_int(w) for w in want)
    w = np.asarray(want)
    return w.astype(np.int32) if w.dtype == np.int64 else want


@pytest.mark.parametrize("fn, ref, inputs, grad, tol", CASES)
def test_op_matches_numpy(backend, fn, ref, inputs, grad, tol):
    got = fn(*[to_backend(backend, v) for v in inputs])
    want = ref(*inputs)
    if backend == "jax":
        want = _jax_int(want)
    assert_same(got, want, tol)


GRAD_CASES = [p for p in CASES if p.values[3]]


class _OpOf(lm.Module):
    """A module whose only parameter is the op's first input, so that lm.value_and_grad differentiates it."""

    def __init__(self, fn, x, rest, weights):
        super().__init__()
        self.fn, self.rest, self.weights = fn, rest, weights  # weights: None for a non-float output
        self.x = lm.Parameter(value=x)

    def forward(self, _):
        out = self.fn(self.x, *self.rest)
        parts = out if isinstance(out, (list, tuple)) else [out]
        return sum(lm.ops.sum(o * w) for o, w in zip(parts, self.weights) if w is not None)


@pytest.mark.parametrize("fn, ref, inputs, grad, tol", GRAD_CASES)
def test_op_gradient_matches_finite_differences(grad_backend, fn, ref, inputs, grad, tol):
    x, rest = inputs[0], inputs[1:]
    out = ref(*inputs)
    parts = out if isinstance(out, (list, tuple)) else [out]
    weights = [np.random.default_rng(7).standard_normal(np.shape(p)).astype(np.float32)
               if np.asarray(p).dtype.kind == "f" else None for p in parts]

    def loss(v):
        o = ref(v, *[r.astype(np.float64) if isinstance(r, np.ndarray) and r.dtype == np.float32 else r
                     for r in rest])
        ps = o if isinstance(o, (list, tuple)) else [o]
        return sum(float(np.sum(np.asarray(p, np.float64) * w)) for p, w in zip(ps, weights) if w is not None)

    want = numeric_grad(loss, x.astype(np.float64), eps=1e-4)
    model = _OpOf(fn, x, [to_backend(grad_backend, r) for r in rest], [to_backend(grad_backend, w) for w in weights])
    _, grads = lm.value_and_grad(lambda m, _: m(_))(model, np.zeros(1, np.float32))
    np.testing.assert_allclose(to_np(grads["x"]), want, rtol=2e-3, atol=2e-3)


# ----- placement: like=, the calling module, the current backend ----------------------------------------------
class MakesArrays(lm.Module):
    def forward(self, x):
        return {"zeros": lm.ops.zeros((2, 3)), "arange": lm.ops.arange(4), "full": lm.ops.full((2,), 1.5),
                "eye": lm.ops.eye(2), "from_helper": self.helper(), "mask": lm.ops.sequence_mask(
                    lm.ops.arange(3), 3), "sum": x + lm.ops.ones(x.shape)}

    def helper(self):
        return lm.ops.linspace(0.0, 1.0, 3)


def test_creation_inside_forward_uses_the_modules_backend(backend):
    model = MakesArrays()
    other = {"torch": "numpy", "jax": "numpy", "tensorflow": "numpy", "numpy": "jax" if "jax" in BACKENDS else "numpy"}
    lm.set_backend(other[backend])  # the current backend is not the module's: the module wins
    out = model(lm.get_backend(backend).from_numpy(np.ones(3, np.float32)))
    for name, v in out.items():
        assert lm.backend_of(v).name == backend, name
    assert str(to_np(out["zeros"]).dtype) == "float32"
    np.testing.assert_array_equal(to_np(out["arange"]), np.arange(4))
    np.testing.assert_allclose(to_np(out["from_helper"]), [0, 0.5, 1])
    np.testing.assert_array_equal(to_np(out["sum"]), np.full(3, 2.0))


def test_creation_outside_a_module_uses_the_current_backend(backend):
    assert lm.backend_of(lm.ops.zeros(3)).name == backend
    assert lm.backend_of(lm.ops.arange(3)).name == backend


def test_like_gives_backend_and_dtype_family(backend):
    b = lm.get_backend(backend)
    half = b.from_numpy(np.ones(2, np.float16))
    ints = b.from_numpy(np.ones(2, np.int32))
    lm.set_backend("numpy")
    assert lm.backend_of(lm.ops.zeros(3, like=half)).name == backend
    assert to_np(lm.ops.zeros(3, like=half)).dtype == np.float16     # float from a float like: its precision
    assert to_np(lm.ops.zeros(3, like=ints)).dtype == np.float32     # float from an int like: float32
    assert to_np(lm.ops.arange(3, like=ints)).dtype == np.int32      # int from an int like: its precision
    assert to_np(lm.ops.arange(3.0, like=half)).dtype == np.float16
    assert to_np(lm.ops.full(2, 1, like=half)).dtype.kind == "i"
    assert to_np(lm.ops.zeros(2, like=half, dtype="int32")).dtype == np.int32


def test_creation_under_jit_and_grad():
    pytest.importorskip("jax")
    import jax

    lm.set_backend("jax")

    @jax.jit
    def f(x):
        return x + lm.ops.arange(3.0, like=x) + lm.ops.pad(x, (1, 0))[1:] + lm.ops.masked_fill(x, x > 1, 0.0)

    np.testing.assert_allclose(np.asarray(f(lm.ops.ones(3))), [3, 4, 5])
    g = jax.grad(lambda x: lm.ops.sum(lm.ops.top_k(x, 2)[0] * lm.ops.arange(1.0, 3.0, like=x)))
    np.testing.assert_allclose(np.asarray(g(lm.get_backend("jax").from_numpy(np.array([1.0, 5.0, 3.0],
                                                                                       np.float32)))), [0, 1, 2])


# ----- edge cases and errors --------------------------------------------------------------------------------
def test_flip_works_on_torch_where_negative_strides_do_not(backend):
    x = lm.get_backend(backend).from_numpy(np.arange(6.0, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(to_np(lm.ops.flip(x, axis=-1)), [[2, 1, 0], [5, 4, 3]])
    np.testing.assert_array_equal(to_np(lm.ops.flip(x, axis=(0, 1))), [[5, 4, 3], [2, 1, 0]])


def test_reductions_return_arrays_that_ops_accept(backend):
    x = lm.get_backend(backend).from_numpy(A)
    for r in (lm.ops.sum(x), lm.ops.max(x), lm.ops.argmax(x), lm.ops.mean(x), lm.ops.all(x > -10)):
        assert lm.backend_of(r) is not None
        lm.ops.exp(lm.ops.astype(r, "float32"))


def test_numpy_scalars_are_accepted():
    assert float(lm.ops.exp(np.float32(0.0))) == 1.0


def test_split_errors_say_what_to_do(backend):
    x = lm.get_backend(backend).from_numpy(A)
    with pytest.raises(ValueError, match="cannot cut an axis of length 4.*into 3 equal parts"):
        lm.ops.split(x, 3, axis=1)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        lm.ops.split(x, 2, axis=2)


def test_bad_inputs_raise_clear_errors(backend):
    x = lm.get_backend(backend).from_numpy(A)
    with pytest.raises(TypeError, match="expected an array of torch, jax or numpy, got builtins.list"):
        lm.ops.exp([1.0, 2.0])
    with pytest.raises(ValueError, match="pad_width"):
        lm.ops.pad(x, ((1, 1), (1, 1), (1, 1)))
    with pytest.raises(ValueError, match="unknown mode 'wrap'"):
        lm.ops.pad(x, 1, mode="wrap")
    with pytest.raises(ValueError, match="top_k: k=5"):
        lm.ops.top_k(x, 5)


def test_every_public_op_has_a_docstring_and_a_test():
    from lamina.ops import numpy as ns

    tested = {p.id.split("_")[0] for p in CASES} | {p.id for p in CASES}
    for name in ns.__all__:
        assert getattr(lm.ops, name).__doc__, name
        assert name in tested or any(p.id.startswith(name) for p in CASES), f"no test case for lm.ops.{name}"
