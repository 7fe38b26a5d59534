"""A Lamina model presented as a real ``torch.nn.Module``, for what torch builds on modules: DistributedDataParallel,
FSDP2 (``fully_shard``), ``torch.optim``, hooks.

``as_torch_module(model)`` returns a ``torch.nn.Module`` whose parameters and buffers are the Lamina model's own
tensors, registered under the same dotted paths (``module.state_dict()`` has Lamina's keys). Its ``forward`` runs
the Lamina model through ``lm.functional_call`` on whatever tensors the torch module holds at that moment, so a
wrapper that swaps parameters (FSDP2 all-gathers sharded ones before each forward) is seen by the model; buffer
writes made by ``forward`` (BatchNorm's running statistics) are copied back into the module's buffers.

Optimizers. Under DDP (or no wrapper) the module's parameters *are* the model's tensors: ``loss.backward()``
leaves the averaged gradients on them, and ``torch.optim`` over ``module.parameters()`` or an ``lm.optim``
optimizer of the model (``opt.step()``) both update the model in place. FSDP2's ``fully_shard`` replaces the
module's parameters with new ``DTensor`` parameters that hold one shard each; the gradients go to those, and
the model's own tensors are no longer read or written by the module. An optimizer must then step the shards:
``torch.optim`` over ``module.parameters()`` (after ``fully_shard``), then ``module.gather_into_model()``.
``lm.optim`` steps the model's tensors, which FSDP2 no longer trains, so its ``step`` refuses parameters in that
state (see :func:`sharded_elsewhere`); ``lm.fit(..., parallel=lm.distributed.DataParallel(shard_params=True))``
runs an ``lm.optim`` optimizer on the shards.

>>> import lamina as lm  # doctest: +SKIP
>>> net = lm.Sequential(lm.Linear(8, 4), lm.ReLU(), lm.Linear(4, 1)).to(backend="torch")  # doctest: +SKIP
>>> ddp = torch.nn.parallel.DistributedDataParallel(lm.as_torch_module(net))  # doctest: +SKIP
"""

from __future__ import annotations

import weakref

from ..errors import BackendError

__all__ = ["as_torch_module", "sharded_elsewhere"]

_CLASS = []

#: Lamina Parameter -> (a weak reference to the torch module whose sharding wrapper took its training over, its
#: path), noted by that module's forward: while the module lives, an ``lm.optim`` step of the parameter would
#: update a tensor that nobody trains
_TAKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sharded_elsewhere(params) -> str | None:
    """Why ``lm.optim`` cannot step ``params`` (Lamina Parameters), or None: their tensors were replaced in a
    live torch module by FSDP2's shards (``fully_shard(lm.as_torch_module(model))``)."""
    if not _TAKEN:
        return None
    for p in params:
        ref, path = _TAKEN.get(p, (None, None))
        if ref is not None and ref() is not None:
            return (f"parameter '{path}' is trained as FSDP2 shards: a wrapper (FSDP2's fully_shard) replaced the "
                    "torch module's parameters with DTensor shards, which receive the gradients, and an lm.optim step "
                    "would update the model's own full tensors, which the module no longer reads. Step the shards with "
                    "torch.optim over module.parameters() (created after fully_shard) and call "
                    "module.gather_into_model() to bring the model up to date, or train with "
                    "lm.fit(..., parallel=lm.distributed.DataParallel(shard_params=True)), which runs lm.optim on "
                    "the shards")
    return None


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
            # True once a wrapper's replacement of the parameters is noted (lm.fit's FSDP2 plan sets it at the
            # start: it keeps the model and the optimizer in step with the shards itself)
            self._taken = False
            self._paths: list[tuple[str, torch.nn.Module, str, object]] = []
            for path, p in model.named_parameters():
                owner, name = self._owner(path)
                owner.register_parameter(name, p.value)
                self._paths.append((path, owner, name, p))
            for path, b in model.named_buffers():
                owner, name = self._owner(path)
                owner.register_buffer(name, b.value, persistent=getattr(b, "persistent", True))
                self._paths.append((path, owner, name, b))

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

        def _current(self, owner, name):
            t = owner._parameters.get(name)
            return t if t is not None else owner._buffers[name]

        def forward(self, *args, **kwargs):
            tensors = {path: self._current(owner, name) for path, owner, name, _ in self._paths}
            if not self._taken:
                self._note_replaced(tensors)
            out, writes = functional_call(self.lamina_model, tensors, *args, return_buffers=True, **kwargs)
            if writes:
                with torch.no_grad():
                    for path, value in writes.items():
                        tensors[path].copy_(value)
            return out

        def _note_replaced(self, tensors) -> None:
            """Note the parameters whose tensors a wrapper replaced (FSDP2), for ``sharded_elsewhere``."""
            replaced = [(path, p) for path, owner, name, p in self._paths
                        if name in owner._parameters and tensors[path] is not p.value]
            if replaced:
                me = weakref.ref(self)
                for path, p in replaced:
                    _TAKEN[p] = (me, path)
                self._taken = True

        def gather_into_model(self) -> None:
            """Copy the module's current values into the Lamina model's own tensors, in place. After FSDP2's
            ``fully_shard`` the module holds ``DTensor`` shards and the Lamina parameters keep the values they had
            when it was wrapped: call this (on every rank: it all-gathers) before using, evaluating or saving
            the Lamina model. With DDP or no wrapper the tensors are shared already and nothing is copied."""
            with torch.no_grad():
                for _, owner, name, p in self._paths:
                    t = self._current(owner, name)
                    target = p.value
                    if t is not target:
                        target.copy_((t.full_tensor() if hasattr(t, "full_tensor") else t).detach())

        def scatter_from_model(self) -> None:
            """The reverse of :meth:`gather_into_model`: copy rank 0's Lamina model values into the module's
            tensors where a wrapper replaced them (each rank keeps its own shard of a ``DTensor``); every rank
            calls it. Use it after ``fully_shard`` to start every rank from rank 0's values, as DDP does, or
            after changing the model (a checkpoint load) while the module holds shards."""
            from torch.distributed.tensor import DTensor, distribute_tensor

            with torch.no_grad():
                for _, owner, name, p in self._paths:
                    t = self._current(owner, name)
                    source = p.value
                    if t is source:
                        continue
                    if isinstance(t, DTensor):
                        t.copy_(distribute_tensor(source.detach(), t.device_mesh, t.placements))
                    else:
                        t.copy_(source)

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
