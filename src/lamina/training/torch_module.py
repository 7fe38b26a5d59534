"""A Lamina model presented as a real ``torch.nn.Module``, for what torch builds on modules: DistributedDataParallel,
FSDP2 (``fully_shard``), ``torch.optim``, hooks.

``as_torch_module(model)`` returns a ``torch.nn.Module`` whose parameters and buffers are the Lamina model's own
tensors, registered under the same dotted paths (``module.state_dict()`` has Lamina's keys). Its ``forward`` runs
the Lamina model through ``lm.functional_call`` on whatever tensors the torch module holds at that moment, so a
wrapper that swaps parameters (FSDP2 all-gathers sharded ones before each forward) is seen by the model; buffer
writes made by ``forward`` (BatchNorm's running statistics) are copied back into the module's buffers.

>>> import lamina as lm  # doctest: +SKIP
>>> net = lm.Sequential(lm.Linear(8, 4), lm.ReLU(), lm.Linear(4, 1)).to(backend="torch")  # doctest: +SKIP
>>> ddp = torch.nn.parallel.DistributedDataParallel(lm.as_torch_module(net))  # doctest: +SKIP
"""

from __future__ import annotations

from ..errors import BackendError

__all__ = ["as_torch_module"]

_CLASS = []


def _torch_module_class():
    if _CLASS:
        return _CLASS[0]
    import torch

    from ..functional import functional_call

    class LaminaTorchModule(torch.nn.Module):
        """``torch.nn.Module`` view of a Lamina model (see ``lamina.as_torch_module``)."""

        def __init__(self, model):
            super().__init__()
            object.__setattr__(self, "lamina_model", model)  # not a torch submodule: its tensors are ours
            self._paths: list[tuple[str, torch.nn.Module, str]] = []
            for path, p in model.named_parameters():
                owner, name = self._owner(path)
                owner.register_parameter(name, p.value)
                self._paths.append((path, owner, name))
            for path, b in model.named_buffers():
                owner, name = self._owner(path)
                owner.register_buffer(name, b.value, persistent=getattr(b, "persistent", True))
                self._paths.append((path, owner, name))

        def _owner(self, path: str):
            *parents, name = path.split(".")
            m = self
            for part in parents:
                child = m._modules.get(part)
                if child is None:
                    child = torch.nn.Module()
                    m.add_module(part, child)
                m = child
            return m, name

        def forward(self, *args, **kwargs):
            tensors = {}
            for path, owner, name in self._paths:
                t = owner._parameters.get(name)
                tensors[path] = t if t is not None else owner._buffers[name]
            out, writes = functional_call(self.lamina_model, tensors, *args, return_buffers=True, **kwargs)
            if writes:
                with torch.no_grad():
                    for path, value in writes.items():
                        tensors[path].copy_(value)
            return out

        def gather_into_model(self) -> None:
            """Copy the module's current values into the Lamina model's own tensors, in place. After FSDP2's
            ``fully_shard`` the module holds ``DTensor`` shards and the Lamina parameters keep the values they had
            when it was wrapped: call this (on every rank: it all-gathers) before using, evaluating or saving
            the Lamina model. With DDP or no wrapper the tensors are shared already and nothing is copied."""
            model = self.lamina_model
            values = dict(model.named_parameters())
            values.update(dict(model.named_buffers()))
            with torch.no_grad():
                for path, owner, name in self._paths:
                    t = owner._parameters.get(name)
                    t = t if t is not None else owner._buffers[name]
                    full = t.full_tensor() if hasattr(t, "full_tensor") else t
                    target = values[path].value
                    if full is not target:
                        target.copy_(full.detach())

    _CLASS.append(LaminaTorchModule)
    return LaminaTorchModule


def as_torch_module(model):
    """A ``torch.nn.Module`` that shares ``model``'s tensors (see the module docstring). The model must be on the
    torch backend and built (call it once, or ``model.build(shape)``)."""
    if model.backend != "torch":
        raise BackendError(f"as_torch_module() needs a model on the torch backend; this one is on "
                           f"{model.backend}: move it first with model.to(backend='torch')")
    if not model.is_built:
        raise BackendError(f"{type(model).__name__} has layers whose shapes are not known yet; call it once or use "
                           "model.build(input_shape) before as_torch_module()")
    model.ensure_built()
    return _torch_module_class()(model)
