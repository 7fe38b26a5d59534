"""Export a model for serving: a TensorFlow SavedModel (TF Serving, ``tf.saved_model.load``) or a TFLite
flatbuffer (phones, microcontrollers). Neither needs Lamina to run.

The model's forward is traced once by ``tf.function`` in eval mode, for inputs of ``input_shape``
(``None`` for an axis of any size, usually the batch). Parameters become the SavedModel's variables;
buffers (running statistics) become constants. A model on another backend is exported from a copy moved
to tensorflow (``model.to(backend="tensorflow")``); the model itself is left as it is.

    lm.export(net, "served/", format="saved_model", input_shape=(None, 64))
    lm.export(net, "net.tflite", format="tflite", input_shape=(None, 64))

Load the SavedModel with plain TensorFlow: ``tf.saved_model.load("served/").serve(x)``, or through the
``serving_default`` signature (input ``x``, output ``output_0``).
"""

from __future__ import annotations

import copy
import os

from .errors import BackendError
from .module import Module

__all__ = ["export"]

FORMATS = ("saved_model", "tflite")


def export(model: Module, path, format: str = "saved_model", input_shape=None, dtype: str = "float32"):
    """Write ``model`` to ``path`` as a SavedModel directory (``format="saved_model"``) or a TFLite
    flatbuffer file (``format="tflite"``), for inputs of ``input_shape`` and ``dtype``. Returns ``path``.

    Needs tensorflow (``pip install 'lamina[tensorflow]'``). Raises ``ValueError`` for an unknown format
    or a missing input shape, ``LayerError`` naming the model when forward cannot be
    traced by ``tf.function``.
    """
    if format not in FORMATS:
        raise ValueError(f"lm.export: unknown format {format!r}; choose one of {list(FORMATS)}")
    if not isinstance(model, Module):
        raise TypeError(f"lm.export takes an lm.Module, got {type(model).__name__}")
    if input_shape is None:
        state = "is not built yet (its lazy layers infer their sizes from the input)" if not model.is_built \
            else "does not record the shape of its inputs"
        raise ValueError(f"lm.export: {type(model).__name__} {state}; pass input_shape, e.g. "
                         "lm.export(model, path, input_shape=(None, 64)) with None for the batch axis")
    try:
        input_shape = tuple(None if d is None else int(d) for d in input_shape)
    except (TypeError, ValueError) as e:
        raise ValueError(f"lm.export: input_shape must be a tuple of ints or None, got {input_shape!r}") from e
    from .backends import get_backend

    tfb = get_backend("tensorflow")  # a BackendError with the install command when tensorflow is missing
    import tensorflow as tf

    if model._backend is not tfb:
        model = copy.deepcopy(model).to(backend="tensorflow")
    if not model.is_built:
        model.build(input_shape)
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


def _trace(model: Module, input_shape: tuple, dtype, tf):
    """A tf.Module that tracks the model's variables, and the concrete serving function."""
    served = tf.Module()
    served.lamina_variables = [p.value for _, p in model.named_parameters() if isinstance(p.value, tf.Variable)]

    def serve(x):
        return model(x)


    fn = tf.function(serve, input_signature=[tf.TensorSpec(input_shape, dtype, name="x")], autograph=False)
    with model.mode(False):
        try:
            concrete = fn.get_concrete_function()
        except Exception as e:
            from .errors import LayerError

            raise LayerError(model, f"lm.export: {type(model).__name__} could not be traced by tf.function for inputs "
                             f"of shape {input_shape}: {type(e).__name__}: {e}. Its forward must use lm.ops / "
                             "array code only (no Python branches on array values, no .numpy())") from e
    served.serve = fn
    return served, concrete
