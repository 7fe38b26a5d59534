"""The TensorFlow side of ``lm.export`` (``lamina/export.py`` checks the arguments): the model's forward
traced by ``tf.function`` in eval mode, written as a SavedModel or converted to a TFLite flatbuffer.

Axes of any size (``None`` in ``input_shape``) stay symbolic while tracing: ops read their run-time size
where the static one is None (``ops.recurrent``'s zero state, ``reshape``), and ``scan``'s loop writes a
``TensorArray`` made from a tensor, which TFLite lowers to builtins (a reserved one with an unknown element
shape it refuses: "'tf.TensorListReserve' op requires element_shape to be static")."""

from __future__ import annotations

import copy
import os

import numpy as np

from ..backends import get_backend
from ..errors import BackendError, LayerError

__all__ = ["write"]


def write(model, path, format: str, input_shape: tuple, dtype: str):
    """Write ``model`` to ``path`` (see ``lm.export``); returns ``path``."""
    tfb = get_backend("tensorflow")  # a BackendError with the install command when tensorflow is missing
    import tensorflow as tf

    if get_backend(model.backend) is not tfb:
        model = copy.deepcopy(model).to(backend="tensorflow")
    if not model.is_built:  # as its first call would, on zeros of the served dtype (token ids for an Embedding)
        with model.mode(False):
            model(np.zeros([1 if d is None else d for d in input_shape], dtype))
    served, fn = _trace(model, input_shape, tf.as_dtype(dtype), tf)

    path = os.fspath(path)
    if format == "saved_model":
        tf.saved_model.save(served, path, signatures={"serving_default": fn})
        return path
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], served)
    try:
        flat = converter.convert()
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise BackendError(f"lm.export: TFLite could not convert {type(model).__name__}: {e}; the SavedModel "
                           "format takes every TensorFlow op") from e
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:  # atomic: a crash leaves no half-written file
        f.write(flat)
    os.replace(tmp, path)
    return path


def _trace(model, input_shape: tuple, dtype, tf):
    """A tf.Module that tracks the model's variables, and the concrete serving function."""
    served = tf.Module()
    served.lamina_variables = [p.value for _, p in model.named_parameters() if isinstance(p.value, tf.Variable)]

    def serve(x):
        with model.mode(False):  # tf.saved_model.save traces it again, outside the caller's mode
            out = model(x)  # several outputs (an LSTM's (out, (h, c))) become output_0, output_1, ... in flat order
        return out if isinstance(out, tf.Tensor) else tuple(tf.nest.flatten(out))

    fn = tf.function(serve, input_signature=[tf.TensorSpec(input_shape, dtype, name="x")], autograph=False)
    try:
        concrete = fn.get_concrete_function()
    except Exception as e:
        raise LayerError(model, f"lm.export: {type(model).__name__} could not be traced by tf.function for inputs "
                         f"of shape {input_shape}: {type(e).__name__}: {e}. Its forward must use lm.ops / "
                         "array code only (no Python branches on array values, no .numpy())") from e
    served.serve = fn
    return served, concrete
