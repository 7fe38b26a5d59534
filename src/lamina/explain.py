"""Error explanations: an exception leaving a layer gets the layer's dotted path and its input shapes.

Only ever runs after something failed, so the call path pays nothing for it. The innermost module may
replace a raw error with a clearer one through its ``diagnose(args)`` hook (layers check shapes there);
each module the exception passes through records itself, so the path names the modules actually called.
"""

from __future__ import annotations

from .errors import BackendError, DeviceError, LayerError
from .tree import path_of

__all__ = ["describe", "reraise", "explain"]


def describe(args) -> str:
    shapes = [tuple(a.shape) if hasattr(a, "shape") else type(a).__name__ for a in args]
    return "input shapes " + ", ".join(str(s) for s in shapes) if shapes else "no inputs"


def reraise(module, exc: Exception, args, diagnose: bool = True):
    """Raise ``exc`` again, explained (see ``explain``): the same exception with the layer path, or a
    clearer one chained to it. Only ever called after a failure, so the call path pays nothing for it."""
    new = explain(module, exc, args, diagnose)
    if new is exc:
        raise exc
    raise new from exc


def explain(module, exc: Exception, args, diagnose: bool = True) -> Exception:
    """Called as an exception leaves ``module``: returns the exception to raise, with the layer path.

    The innermost module may replace it with a clearer one (``_diagnose``); each module it passes
    through records itself, so the path names the modules actually called.
    """
    chain = getattr(exc, "_lamina_chain", None)
    if chain is None:
        if diagnose and not isinstance(exc, LayerError | BackendError | DeviceError):
            try:
                better = module.diagnose(args)
            except Exception:  # a diagnosis must never hide the original error
                better = None
            if better is not None:
                exc = better
        chain = [module]
        try:
            exc._lamina_chain = chain
            exc._lamina_inputs = describe(args)
        except Exception:  # exceptions that refuse attributes keep their message as is
            return exc
    elif chain[-1] is not module:
        chain.append(module)
    path = path_of(chain)
    if isinstance(exc, LayerError):
        exc.path = path
        return exc
    note = f"(raised in layer '{path}' ({type(chain[0]).__name__}), called with {exc._lamina_inputs})"
    notes = getattr(exc, "__notes__", None)
    if notes and notes[-1].startswith("(raised in layer "):
        notes[-1] = note
    else:
        exc.add_note(note)
    return exc
