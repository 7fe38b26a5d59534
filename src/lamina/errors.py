"""Lamina's exceptions.

Every error says what happened, where (the layer path or parameter name), what was expected, what was
received and how to fix it. They subclass the built-in exception a user would catch anyway
(``ValueError``, ``TypeError``, ``RuntimeError``), so ``except ValueError`` keeps working.

Layer errors carry the failing module; as the exception travels out through the parent modules'
``__call__``, each parent prepends its own name for the child, so the message names the full dotted
path from the outermost module that was called (``layer '2.0' (MyLinear)``).
"""

from __future__ import annotations


class LaminaError(Exception):
    """Base class of every error that Lamina raises on purpose."""


class LayerError(LaminaError):
    """An error raised inside a layer; its message starts with the layer's path and class.

    ``path`` is filled in as the error travels out through the parent modules (see ``Module.__call__``).
    """

    def __init__(self, layer, message: str):
        super().__init__(message)
        self.layer = layer
        self.message = message
        self.path = ""

    def __str__(self) -> str:
        where = f"layer '{self.path}'" if self.path else "layer"
        return f"{where} ({type(self.layer).__name__}) {self.message}"


class ShapeError(LayerError, ValueError):
    """An input or parameter has the wrong shape for a layer."""


class BackendError(LaminaError, TypeError):
    """Arrays of two different backends met, or a backend cannot do what was asked."""


class DeviceError(LaminaError, ValueError):
    """Arrays on two different devices met."""


class ModuleError(LaminaError, RuntimeError):
    """A module is used in a way its definition does not allow (e.g. ``super().__init__()`` missing)."""


class UninitializedParameterError(LaminaError, RuntimeError):
    """A parameter's value was asked for before its shape was known."""


class CheckpointError(LaminaError, ValueError):
    """A checkpoint file is missing, corrupted, foreign, or does not fit the model."""


class ParameterNotFoundError(LaminaError, KeyError):
    """A dotted path names no parameter or buffer of the model (a ``KeyError``, with a readable message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def few_names(names: list) -> str:
    """The first few names, for an error message: ``['a', 'b', ... (9 in all)]``."""
    more = f", ... ({len(names)} in all)" if len(names) > 4 else ""
    return "[" + ", ".join(repr(k) for k in names[:4]) + more + "]"
