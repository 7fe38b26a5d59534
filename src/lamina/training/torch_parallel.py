"""Data-parallel training on torch for ``fit``: ``DistributedDataParallel`` (or FSDP2's ``fully_shard`` with
``DataParallel(shard_params=True)``) around ``as_torch_module(model)``, on the process group that ``torchrun``
set up. The step is the eager step of ``training/torch.py`` with the forward run through the wrapper, so
that torch averages the gradients over the ranks during ``backward``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .. import context
from ..backends import get_backend
from ..distributed import DistributedError, Plan, check_same_model
from .torch_module import as_torch_module

__all__ = ["plan"]


def plan(model, parallel):
    """A :class:`TorchPlan` when a process group with more than one rank is up, else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return TorchPlan(model, parallel)


def _collective_failed(e: Exception, what: str) -> DistributedError:
    return DistributedError(f"rank {dist.get_rank()}: {what} failed, most likely because another rank died or "
                            f"stopped answering within the process group's timeout ({type(e).__name__}: {e}). "
                            "Look at the other ranks' output for the first error")


class TorchPlan(Plan):
    """``fit``'s plan on a torch process group (see ``lamina.distributed``)."""

    def __init__(self, model, parallel):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.shard = bool(parallel is not None and parallel.shard_params)
        self.device = model.device

    def _device(self):
        return torch.device(self.device) if dist.get_backend() == "nccl" else torch.device("cpu")

    def reduce(self, values) -> np.ndarray:
        t = torch.tensor(np.asarray(values, np.float64), device=self._device())
        try:
            dist.all_reduce(t)
        except RuntimeError as e:
            raise _collective_failed(e, "summing the epoch's figures over the ranks") from e
        return t.cpu().numpy()

    def seed(self, seed):
        box = [seed if seed is not None else int(np.random.SeedSequence().generate_state(1)[0])]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check(self, model) -> None:
        try:
            check_same_model(model)
        except RuntimeError as e:
            if isinstance(e, DistributedError):
                raise
            raise _collective_failed(e, "comparing the ranks' models") from e

    def wrap(self, step, model, loss_fn, optimizer, compile, outputs):
        """The train step, kept with the optimizer like ``fit``'s own (one wrapper per model)."""
        key = ("torch-parallel", id(model), loss_fn, compile, outputs, self.shard)
        hit = optimizer.step_cache.get(key)
        if hit is None or hit[0] is not model:
            hit = optimizer.step_cache[key] = (model, self._make_step(model, loss_fn, optimizer, compile, outputs))
        return hit[1]

    def _make_step(self, model, loss_fn, optimizer, compile, outputs):
        eng = optimizer.engine(get_backend(model.backend))
        made: dict = {}

        def make():
            """The wrapper, made at the first step (the model is built by then): the ranks' models are compared
            first, and DDP starts every rank from rank 0's values."""
            self.check(model)
            module = made["module"] = as_torch_module(model)
            if self.shard:
                from torch.distributed.fsdp import fully_shard

                wrapped = fully_shard(module)
            else:
                kwargs = {"device_ids": [module_device(model)]} if dist.get_backend() == "nccl" else {}
                wrapped = torch.nn.parallel.DistributedDataParallel(module, **kwargs)

            def forward_loss(x, y):
                out = wrapped(x)
                return loss_fn(out, y), out

            made["run"] = torch.compile(forward_loss) if compile else forward_loss

        cache = [None, None]

        def step(x, y, lr):
            if not made:
                make()
            run, module = made["run"], made["module"]
            version = context.structure_version()
            if cache[0] != version:
                cache[:] = [version, _entries(module, optimizer, self.shard)]
            entries = cache[1]
            for _, p in entries:
                p.grad = None
            try:
                loss, out = run(x, y)
                loss.backward()
            except RuntimeError as e:
                if "gloo" in str(e).lower() or "nccl" in str(e).lower() or "connection" in str(e).lower():
                    raise _collective_failed(e, "averaging the gradients") from e
                raise
            eng.step(entries, None, lr)
            return loss.detach(), (out.detach() if outputs else None)

        step.many = None
        step.group = lambda x: 1
        step.made = made
        return step


class _Sharded:
    """An ``(path, Parameter)``-like entry over a sharded torch parameter, for the optimizer engine."""

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


def _entries(module, optimizer, shard):
    entries = optimizer.entries()
    if not shard:
        return entries
    params = dict(module.named_parameters())
    return [(k, _Sharded(params[k])) for k, _ in entries]


def module_device(model):
    d = torch.device(model.device)
    return d.index if d.type == "cuda" else None
