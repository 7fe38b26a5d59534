"""Bad input into layers, losses and metrics (issue 10): an error that names the layer and both sizes,
raised before any native kernel runs, on every backend; never a crash, never a silently wrong answer."""

from __future__ import annotations

import numpy as np
import pytest

import lamina as lm

from conftest import BACKENDS, rand, to_np


def on(backend, x):
    return lm.get_backend(backend).from_numpy(np.asarray(x))


# ----- recurrent layers: the torch kernel segfaulted on a wrong feature size ---------------------------
@pytest.mark.parametrize("cls", [lm.LSTM, lm.GRU, lm.RNN])
def test_recurrent_wrong_feature_size_is_a_shape_error(backend, cls):
    m = cls(512)
    m.build((2, 3, 1))
    with pytest.raises(lm.ShapeError) as e:
        m(np.ones((2, 3, 4096), np.float32))
    msg = str(e.value)
    assert cls.__name__ in msg and "1 input features" in msg and "(2, 3, 4096)" in msg
    with pytest.raises(lm.ShapeError, match="expected input"):
        m(np.ones((2, 3), np.float32))  # no time axis


def test_lstm_wrong_state_size_is_a_shape_error(backend):
    m = lm.LSTM(4, num_layers=2)
    x = rand(3, 5, 2)
    good = (np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.float32))
    out, (h, c) = m(x, good)  # NumPy states are converted
    assert to_np(out).shape == (3, 5, 4) and to_np(h).shape == (2, 3, 4)
    for bad in [(np.zeros((2, 3, 5), np.float32), good[1]), (good[0], np.zeros((1, 3, 4), np.float32)),
                (np.zeros((2, 7, 4), np.float32), np.zeros((2, 7, 4), np.float32))]:
        with pytest.raises(lm.ShapeError, match=r"\(num_layers, N, hidden_size\) = \(2, 3, 4\)"):
            m(x, bad)
        with pytest.raises(lm.ShapeError, match="LSTM"):
            m(x, state=bad)  # as a keyword too


def test_gru_wrong_state_size_is_a_shape_error(backend):
    m = lm.GRU(4)
    with pytest.raises(lm.ShapeError, match=r"= \(1, 3, 4\), got \(1, 3, 6\)"):
        m(rand(3, 5, 2), np.zeros((1, 3, 6), np.float32))


def test_recurrent_op_checks_sizes_before_the_kernel(backend):
    w = [(on(backend, np.zeros((8, 3), np.float32)), on(backend, np.zeros((8, 2), np.float32)), None, None)]
    with pytest.raises(ValueError, match=r"need input \(N, T, 3\), got shape \(4, 5, 7\)"):
        lm.ops.recurrent(on(backend, np.ones((4, 5, 7), np.float32)), w)
    with pytest.raises(ValueError, match="state of shape"):
        lm.ops.recurrent(on(backend, np.ones((4, 5, 3), np.float32)), w, (np.zeros((1, 4, 3)), np.zeros((1, 4, 2))))


# ----- convolution: numpy convolved the first 2 of 3 channels ------------------------------------------
@pytest.mark.parametrize("cls, shape", [(lm.Conv2d, (1, 2, 5, 5)), (lm.Conv1d, (1, 2, 5))])
def test_conv_wrong_channel_count_is_a_shape_error(backend, cls, shape):
    m = cls(4, 3)
    m(np.ones(shape, np.float32))
    bad = (shape[0], 3, *shape[2:])
    with pytest.raises(lm.ShapeError) as e:
        m(np.ones(bad, np.float32))
    assert cls.__name__ in str(e.value) and "(N, 2, ...)" in str(e.value) and str(bad) in str(e.value)


# ----- embedding: -1 picked the last row, 1.7 row 1 -----------------------------------------------------
def test_embedding_rejects_out_of_range_and_non_integer_indices(backend):
    m = lm.Embedding(5, 3)
    table = to_np(m(np.arange(5)))  # the rows, in order
    np.testing.assert_array_equal(to_np(m(np.array([4, 0]))), table[[4, 0]])
    for bad in ([-1], [5], [[0, 9]]):
        with pytest.raises(ValueError, match=r"out of range for a table of 5 rows"):
            m(np.array(bad))
    with pytest.raises(TypeError, match="must be integers"):
        m(np.array([1.7]))


def test_embedding_under_jax_tracing_gives_nan_rows_not_clamped_ones():
    if "jax" not in BACKENDS:
        pytest.skip("jax not installed")
    import jax

    w = on("jax", np.arange(6, dtype=np.float32).reshape(3, 2))
    out = np.asarray(jax.jit(lm.ops.embedding)(w, on("jax", np.array([0, -1, 3]))))
    np.testing.assert_array_equal(out[0], [0, 1])
    assert np.isnan(out[1:]).all()


# ----- normalization ---------------------------------------------------------------------------------------
def test_batchnorm_on_an_empty_batch_raises_and_keeps_its_statistics(backend):
    bn = lm.BatchNorm1d()
    bn(rand(8, 3))
    before = {k: to_np(v).copy() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="empty batch"):
        bn(np.zeros((0, 3), np.float32))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(to_np(v), before[k])
        assert np.isfinite(to_np(v)).all()
    with pytest.raises(lm.ShapeError, match="BatchNorm1d"):
        bn(rand(8, 4))
    bn.eval()
    assert to_np(bn(np.zeros((0, 3), np.float32))).shape == (0, 3)  # eval mode needs no batch statistics


@pytest.mark.parametrize("cls", [lm.LayerNorm, lm.RMSNorm])
def test_norm_built_for_4_features_refuses_1(backend, cls):
    m = cls()
    m(rand(2, 4))
    with pytest.raises(lm.ShapeError, match=r"last axis 4, got shape \(2, 1\)"):
        m(rand(2, 1))  # numpy broadcast (2, 1) against the (4,) weight


def test_attention_refuses_key_and_value_that_do_not_fit(backend):
    m = lm.MultiHeadAttention(8, 2)
    q = rand(2, 5, 8)
    assert to_np(m(q, rand(2, 7, 8), rand(2, 7, 8))).shape == (2, 5, 8)
    with pytest.raises(lm.ShapeError, match="MultiHeadAttention"):
        m(q, rand(3, 7, 8), rand(3, 7, 8))
    with pytest.raises(lm.ShapeError, match="MultiHeadAttention"):
        m(q, rand(2, 7, 8), rand(2, 6, 8))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape"):
        m(q, key_padding_mask=np.zeros((2, 4), bool))


# ----- losses and metrics ------------------------------------------------------------------------------------
def test_mse_refuses_shapes_that_would_broadcast(backend):
    pred, y = on(backend, rand(6, 1)), rand(6)
    with pytest.raises(ValueError, match=r"\(6, 1\).*\(6,\)"):
        lm.losses.mse(pred, y)  # used to average a 6 x 6 matrix
    got = float(to_np(lm.losses.mse(pred, y[:, None])))  # NumPy targets are converted (issue 9)
    np.testing.assert_allclose(got, np.mean((rand(6, 1) - y[:, None]) ** 2), rtol=1e-6)


def test_binary_cross_entropy_refuses_mismatched_shapes(backend):
    with pytest.raises(ValueError, match=r"\(4, 1\).*\(4,\)"):
        lm.losses.binary_cross_entropy_with_logits(on(backend, rand(4, 1)), np.ones(4, np.float32))


def test_cross_entropy_takes_numpy_labels_and_checks_them(backend):
    x = rand(5, 3)
    y = np.array([0, 2, 1, 1, 0])
    logp = x - np.log(np.exp(x).sum(1, keepdims=True))
    ref = -logp[np.arange(5), y].mean()
    logits = on(backend, x)
    np.testing.assert_allclose(float(to_np(lm.losses.cross_entropy(logits, y))), ref, rtol=1e-5)  # issue 9
    np.testing.assert_allclose(float(to_np(lm.losses.cross_entropy(logits, y[:, None]))), ref, rtol=1e-5)
    for bad in ([0, 2, 1, 1, -1], [0, 2, 1, 1, 3], [0, 2, 1, 1, -100]):
        with pytest.raises(ValueError, match="is not a class of scores with 3 classes"):
            lm.losses.cross_entropy(logits, np.array(bad))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        lm.losses.cross_entropy(logits, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(5, 2\)"):
        lm.losses.cross_entropy(logits, np.ones((5, 2), np.float32))


def test_cross_entropy_over_a_sequence_takes_the_last_axis_as_classes(backend):
    x = rand(2, 4, 3)
    y = np.array([[0, 1, 2, 1], [2, 2, 0, 0]])
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, y[..., None], -1).mean()
    np.testing.assert_allclose(float(to_np(lm.losses.cross_entropy(on(backend, x), y))), ref, rtol=1e-5)


def test_accuracy_with_column_labels_is_right_and_mismatches_are_refused(backend):
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], np.float32)
    labels = np.array([1, 0, 0, 0])
    ref = (scores.argmax(1) == labels).mean()
    s = on(backend, scores)
    assert float(to_np(lm.losses.accuracy(s, labels[:, None]))) == ref == 0.75
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        lm.losses.accuracy(s, np.array([1, 0]))
    with pytest.raises(ValueError, match="C >= 2"):
        lm.losses.accuracy(on(backend, scores[:, :1]), labels[:, None])
    with pytest.raises(ValueError, match="not a class"):
        lm.losses.accuracy(s, np.array([1, 0, 2, 0]))


# ----- adversarial review: bad input used to reach the kernels (raw RuntimeError, lax TypeError, silence) --
def _raised_by_lamina(exc) -> bool:
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "/lamina/" in tb.tb_frame.f_code.co_filename.replace("\\", "/")


@pytest.mark.parametrize("cls", [lm.LSTM, lm.GRU, lm.RNN])
def test_recurrent_refuses_integer_input_on_every_backend(backend, cls):
    with pytest.raises(TypeError, match="expects floating-point input, got dtype int") as e:
        cls(8)(np.ones((2, 3, 4), np.int64))  # numpy used to compute silently, torch/jax raised raw errors
    assert _raised_by_lamina(e.value) and cls.__name__ in "".join(getattr(e.value, "__notes__", []))


@pytest.mark.parametrize("cls", [lm.LSTM, lm.GRU, lm.RNN])
def test_recurrent_refuses_an_empty_sequence_on_every_backend(backend, cls):
    # one rule (as torch): T = 0 is a ValueError; jax used to return zeros, numpy a raw np.stack error
    with pytest.raises(ValueError, match="sequence is empty") as e:
        cls(8)(np.ones((2, 0, 4), np.float32))
    assert _raised_by_lamina(e.value)


def test_conv_on_an_image_smaller_than_the_kernel_is_a_value_error(backend):
    with pytest.raises(ValueError, match=r"input spatial size \(2, 2\) is smaller than the kernel \(3, 3\) even "
                                         r"with padding") as e:
        lm.Conv2d(2, 4, 3)(np.ones((1, 2, 2, 2), np.float32))  # jax gave (1, 4, 0, 0) silently
    assert _raised_by_lamina(e.value)
    assert lm.Conv2d(2, 4, 3, padding=1)(np.ones((1, 2, 2, 2), np.float32)).shape == (1, 4, 2, 2)


def test_batchnorm_training_on_one_value_per_channel_refuses_and_keeps_statistics(backend):
    bn = lm.BatchNorm1d(3)
    bn(rand(4, 3))
    before = [to_np(getattr(bn, n)).copy() for n in ("running_mean", "running_var", "num_batches_tracked")]
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(rand(1, 3))  # torch.nn.BatchNorm1d raises the same; jax/numpy used to give zeros and move the stats
    after = [to_np(getattr(bn, n)) for n in ("running_mean", "running_var", "num_batches_tracked")]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    bn.eval()
    assert bn(rand(1, 3)).shape == (1, 3)  # eval mode on one example is fine, as in torch


def test_embedding_refuses_bool_indices_on_every_backend(backend):
    with pytest.raises(TypeError, match="indices must be integers, got dtype bool"):
        lm.Embedding(10, 4)(np.array([True, False]))  # torch used to accept them as 1 and 0


def test_mean_of_integers_is_a_type_error_on_every_backend(backend):
    x = on(backend, np.arange(4))
    with pytest.raises(TypeError, match="takes floating-point input .*got dtype int"):
        lm.ops.mean(x)  # torch raised a raw RuntimeError, jax gave float32, numpy float64, tensorflow an int
    np.testing.assert_allclose(to_np(lm.ops.mean(lm.ops.astype(x, "float32"))), 1.5)


@pytest.mark.parametrize("make, shape", [(lambda: lm.Linear(4), (3, 5)), (lambda: lm.LayerNorm(), (2, 6)),
                                         (lambda: lm.Conv1d(4, 3), (2, 3, 9))])
def test_float_layers_refuse_integer_input_with_one_type_error(backend, make, shape):
    layer = make()
    layer(rand(*shape))
    try:
        layer(np.ones(shape, np.int32))
    except Exception as e:  # numpy may compute (it promotes); a refusal must be lamina's TypeError
        assert isinstance(e, TypeError) and _raised_by_lamina(e), repr(e)
