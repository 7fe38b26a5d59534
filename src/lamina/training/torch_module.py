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
the model's own tensors are no longer read or written by the module. An optimizer then steps the shards:
``torch.optim`` over ``module.parameters()`` (created after ``fully_shard``), or an ``lm.optim`` optimizer of
the model, whose ``step`` and ``zero_grad`` take each parameter that a live sharded module took over as that
module's shard (see :func:`shard_entries`; the module notes this at its first forward). Its state is sharded
with the parameters (state it already had for the full tensors is distributed from rank 0's values at the
first such step), so it must have a ``torch.optim`` class (``SGD``, ``Adam``, ``AdamW``): an optimizer with its
own update rule is refused, as DTensor cannot run it. Either way ``module.gather_into_model()`` (every rank)
brings the model's tensors up to date, and for ``lm.optim`` also gathers the optimizer's state whole, bound
to the model's tensors, so that ``opt.state_dict()`` and ``lm.save(model, path, optimizer=opt)`` (on any rank)
give full values; before it they raise a ``ValueError`` that says to call it. The next ``opt.step()`` shards
the state again.

>>> import lamina as lm  # doctest: +SKIP
>>> net = lm.Sequential(lm.Linear(8, 4), lm.ReLU(), lm.Linear(4, 1)).to(backend="torch")  # doctest: +SKIP
>>> ddp = torch.nn.parallel.DistributedDataParallel(lm.as_torch_module(net))  # doctest: +SKIP
"""

from __future__ import annotations

import weakref

from ..errors import BackendError

__all__ = ["as_torch_module", "shard_entries"]

_CLASS = []

#: Lamina Parameter -> (a weak reference to the torch module whose sharding wrapper took its training over, its
#: path there), noted by that module's forward: while the module lives, an ``lm.optim`` optimizer steps that
#: module's shard of the parameter instead of the parameter's own tensor
_TAKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Sharded:
    """A ``Parameter``-like optimizer entry over a sharded torch parameter (an FSDP2 ``DTensor``): ``value`` is
    the shard, ``grad`` its gradient."""

    def __init__(self, t):
        self._value = t

    @property
    def value(self):
        return self._value

    @property
    def grad(self):
        return self._value.grad

    @grad.setter
    def grad(self, g):
        self._value.grad = g


def shard_entries(optimizer, entries: list, grads=None, stepping: bool = True) -> list:
    """The ``(path, parameter)`` entries that an ``lm.optim`` optimizer steps (``stepping``) or zeroes: each
    Lamina Parameter whose tensor a live FSDP2 module replaced (``fully_shard(lm.as_torch_module(model))``) is
    given as that module's ``DTensor`` shard, with its ``.grad`` (as ``fit``'s FSDP2 path steps them), the
    others as they are. Stepping shards needs the optimizer's ``torch.optim`` class and the gradients that
    ``backward`` left (not ``grads``), else ``ValueError``; the module notes the optimizer, so that its
    ``gather_into_model`` gathers the optimizer's state too."""
    if not _TAKEN:
        return entries
    out, modules = [], []
    for k, p in entries:
        ref, path = _TAKEN.get(p, (None, None))
        module = ref() if ref is not None else None
        if module is None:
            out.append((k, p))
            continue
        if not any(m is module for m in modules):
            modules.append(module)
            _reshard(module)
        out.append((k, _Sharded(module.get_parameter(path))))
    if not modules or not stepping:
        return out
    name = type(optimizer).__name__
    first = next(k for (k, p), (_, q) in zip(entries, out) if p is not q)
    if optimizer.torch_class is None:
        raise ValueError(
            f"{name}.step(): parameter '{first}' is trained as FSDP2 shards (fully_shard replaced the torch module's "
            f"parameters with DTensor shards), and {name} has no torch.optim class (torch_class is None): its own "
            "update rule runs through array functions that DTensor does not support, and a rule that is not "
            "elementwise would be wrong on a shard. Use an optimizer with a torch_class (lm.optim.SGD, Adam, AdamW) "
            "or torch.optim over module.parameters(), or DDP instead of fully_shard")
    if grads is not None:
        raise ValueError(f"{name}.step(grads): parameter '{first}' is trained as FSDP2 shards, whose gradients "
                         "loss.backward() leaves on the shards; call opt.step() without grads")
    for m in modules:
        m._note_optimizer(optimizer)
    return out


def _reshard(module) -> None:
    """Register FSDP2's sharded parameters again where a forward without backward left the full ones (the root
    keeps them after its forward): what follows reads and writes the shards (a no-op where they are there)."""
    for m in module.modules():
        reshard = getattr(m, "reshard", None)
        if callable(reshard):
            reshard()


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
            # start: it steps the shards and keeps the model and the optimizer in step with them itself)
            self._taken = False
            self._optimizers: list = []  # weak references to the lm.optim optimizers that stepped our shards
            self._paths: list[tuple[str, torch.nn.Module, str, object]] = []
            for path, p in model.named_parameters():
                p.order = "C"  # FSDP2 refuses other memory (a Linear weight's is column-major): torch's own layout
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
            """Note the parameters whose tensors a wrapper replaced (FSDP2), for ``shard_entries``."""
            replaced = [(path, p) for path, owner, name, p in self._paths
                        if name in owner._parameters and tensors[path] is not p.value]
            if replaced:
                me = weakref.ref(self)
                for path, p in replaced:
                    _TAKEN[p] = (me, path)
                self._taken = True

        def _note_optimizer(self, optimizer) -> None:
            """Remember an ``lm.optim`` optimizer that steps our shards (in the order of first use, the same
            on every rank: ``gather_into_model`` gathers their states in that order)."""
            if not any(r() is optimizer for r in self._optimizers):
                self._optimizers.append(weakref.ref(optimizer))

        def gather_into_model(self) -> None:
            """Copy the module's current values into the Lamina model's own tensors, in place. After FSDP2's
            ``fully_shard`` the module holds ``DTensor`` shards and the Lamina parameters keep the values they had
            when it was wrapped: call this (on every rank: it all-gathers) before using, evaluating or saving
            the Lamina model. The state of each ``lm.optim`` optimizer that stepped the shards is gathered whole
            too, bound to the model's tensors (its next step shards it again). With DDP or no wrapper the
            tensors are shared already and nothing is copied."""
            with torch.no_grad():
                for _, owner, name, p in self._paths:
                    t = self._current(owner, name)
                    target = p.value
                    if t is not target:
                        target.copy_((t.full_tensor() if hasattr(t, "full_tensor") else t).detach())
            from ..backends import get_backend

            for ref in self._optimizers:
                optimizer = ref()
                if optimizer is not None:
                    optimizer.engine(get_backend(self.lamina_model.backend)).rebind(optimizer.entries())

        def scatter_from_model(self) -> None:
            """The reverse of :meth:`gather_into_model`: copy rank 0's Lamina model values into the module's
            tensors where a wrapper replaced them (each rank keeps its own shard of a ``DTensor``); every rank
            calls it. Use it after ``fully_shard`` to start every rank from rank 0's values, as DDP does, or
            after changing the model (a checkpoint load) while the module holds shards."""
            from torch.distributed.tensor import DTensor, distribute_tensor

            _reshard(self)
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
    torch backend and built (call it once, or ``model.build(shape)``). Its parameters are made row-major first
    (``order="C"``; a large ``Linear`` weight is column-major otherwise): FSDP2's ``fully_shard`` takes no other
    memory. Such a weight gets a new tensor (its gradient is dropped): take references to the model's tensors
    after this call. ``lm.optim`` optimizers follow by themselves."""
    if model.backend != "torch":
        raise BackendError(f"as_torch_module() needs a model on the torch backend; this one is on "
                           f"{model.backend}: move it first with model.to(backend='torch')")
    if not model.is_built:
        raise BackendError(f"{type(model).__name__} has layers whose shapes are not known yet; call it once or use "
                           "model.build(input_shape) before as_torch_module()")
    model.ensure_built()
    return _torch_module_class()(model)
