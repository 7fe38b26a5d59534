"""Export a model for serving: a TensorFlow SavedModel (TF Serving, ``tf.saved_model.load``) or a TFLite
flatbuffer (phones, microcontrollers). Neither needs Lamina to run.

The model's forward is traced once by ``tf.function`` in eval mode, for inputs of ``input_shape``
(``None`` for an axis of any size, usually the batch). Parameters become the SavedModel's variables;
buffers (running statistics) become constants. A model on another backend is exported from a copy moved
to tensorflow (``model.to(backend="tensorflow")``); the model itself is left as it is.

    lm.export(net, "served/", format="saved_model", input_shape=(None, 64))
    lm.export(net, "net.tflite", format="tflite", input_shape=(None, 64))

Load the SavedModel with plain TensorFlow: ``tf.saved_model.load("served/").serve(x)``, or through the
``serving_default`` signature (input ``x``, output ``output_0``). A model with several outputs (a nested
tuple such as an LSTM's ``(out, (h, c))``) serves them flattened, in ``tf.nest.flatten`` order: ``output_0``,
``output_1``, ... (``serve(x)`` returns that flat tuple; a TFLite model has that many output tensors).
"""

from __future__ import annotations

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
    from .training import tensorflow_export  # the TensorFlow-specific part lives in a training room

    return tensorflow_export.write(model, path, format, input_shape, dtype)
