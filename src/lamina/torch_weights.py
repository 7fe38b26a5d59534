"""Weights from PyTorch: a ``torch.nn.Module`` or its state dict into the equivalent Lamina model.

Lamina's parameter names follow torch's wherever the layers coincide (``0.weight``, ``weight_ih_l0``,
``running_mean``, ...), but two layouts differ on purpose: ``Linear`` stores its weight as (in, out), the
textbook's ``MyLinear`` layout (``x @ weight``, as Keras, Flax and JAX do), where ``torch.nn.Linear`` stores
(out, in); and ``MultiHeadAttention`` keeps its output projection as ``out_proj_weight`` where torch has a
child ``out_proj.weight``. ``load_torch`` maps both, and any layer that declares its own mapping.

The per-layer knowledge sits in the layers: a layer (a user's too) whose names or layouts differ from
its torch counterpart defines ``from_torch_state(self, state)``. It receives ``{name: np.ndarray}``, the
torch keys under the layer's path with the path removed (``"weight"``, ``"out_proj.weight"``), which no
layer inside it has claimed, and returns the same for Lamina's names and layouts. Layers are visited
children before parents, so a parent's hook sees only what its children left. Layers without a hook
take the torch keys as they are.

This module imports no backend: torch tensors are read through the backend that owns them.
"""

from __future__ import annotations

import numpy as np

from .backends import backend_of
from .errors import CheckpointError

__all__ = ["load_torch", "convert_torch_state", "is_torch_state_dict"]


def is_torch_state_dict(state) -> bool:
    """True for what ``torch.nn.Module.state_dict()`` returns: an ``OrderedDict`` carrying torch's
    ``_metadata`` attribute (a Lamina state dict is a plain dict)."""
    return getattr(state, "_metadata", None) is not None and hasattr(state, "items")


def _to_numpy(v) -> np.ndarray:
    b = backend_of(v)
    return np.asarray(v) if b is None else np.asarray(b.to_numpy(v))


def convert_torch_state(model, state) -> dict:
    """``{Lamina key: np.ndarray}`` for ``model`` from a torch state dict (``{torch key: tensor}``), each
    layer's ``from_torch_state`` applied to the keys under its path (see the module's docstring)."""
    if not hasattr(state, "items"):
        raise TypeError(f"convert_torch_state: expected a torch state dict (a mapping of names to tensors), "
                        f"got {type(state).__name__}")
    pool = {k: _to_numpy(v) for k, v in state.items()}
    out: dict = {}
    # deepest layers first: a layer's hook sees only the keys no layer inside it has claimed
    for path, layer in sorted(model.named_modules(), key=lambda pm: -len(pm[0].split(".")) if pm[0] else 1):
        hook = getattr(layer, "from_torch_state", None)
        if hook is None:
            continue
        prefix = f"{path}." if path else ""
        local = {k[len(prefix):]: pool[k] for k in pool if k.startswith(prefix)}
        if not local:
            continue
        try:
            converted = hook(dict(local))
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"cannot convert the torch weights of layer '{path or '(root)'}' "
                                  f"({type(layer).__name__}) {sorted(local)}: {e}") from e
        for k in local:
            del pool[prefix + k]
        out.update({prefix + k: v for k, v in converted.items()})
    out.update(pool)
    return out


def load_torch(model, source, *, strict: bool = True, allow_missing: bool = False, ignore_extra: bool = False):
    """Load a ``torch.nn.Module`` (or its ``state_dict()``) into the equivalent Lamina model; returns the
    model. Names and layouts are mapped for every built-in layer (``Linear``'s weight transposed from
    torch's (out, in) to Lamina's (in, out); ``MultiHeadAttention``'s ``out_proj.weight`` /
    ``out_proj.bias`` to ``out_proj_weight`` / ``out_proj_bias``; Conv, Embedding, LayerNorm, BatchNorm
    (``num_batches_tracked`` included) and RNN/GRU/LSTM as they are), so that the model then computes
    what the torch module computes. The model must have the torch module's structure: the same child
    names (``Sequential`` children ``"0"``, ``"1"``, ...; layers without parameters may sit anywhere).
    Loading is strict and all-or-nothing as ``load_state_dict`` (same keywords); torch's
    ``MultiheadAttention`` is time-major unless built with ``batch_first=True``, Lamina's is batch first.

    >>> import lamina as lm, torch
    >>> tnet = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> lm.set_backend("numpy"); net = lm.load_torch(lm.Sequential(lm.Linear(4), lm.ReLU(), lm.Linear(2)), tnet)
    <lamina backend 'numpy'>
    >>> x = torch.randn(3, 4)
    >>> bool(abs(net(x.numpy()) - tnet(x).detach().numpy()).max() < 1e-6)
    True
    """
    state = source
    if not hasattr(source, "items") and callable(getattr(source, "state_dict", None)):
        state = source.state_dict()  # a torch.nn.Module
    if not hasattr(state, "items"):
        raise TypeError(f"load_torch(model, source): source is a torch.nn.Module or its state_dict(), got "
                        f"{type(source).__name__}")
    return model.load_state_dict(convert_torch_state(model, state), strict=strict, allow_missing=allow_missing,
                                 ignore_extra=ignore_extra)
