"""Data-parallel training on torch for ``fit``: ``DistributedDataParallel`` (or FSDP2's ``fully_shard`` with
``DataParallel(shard_params=True)``) around ``as_torch_module(model)``, on the process group that ``torchrun``
set up. The step is the eager step of ``training/torch.py`` with the forward run through the wrapper, so
that torch averages the gradients over the ranks during ``backward``.

With FSDP2 the module trains ``DTensor`` shards, not the model's tensors, and the optimizer engine steps those
shards (its state is sharded with them). Between epochs the model and the optimizer are whole again, so that
validation, callbacks, ``lm.Checkpoint`` and the user see the current values: at the end of each epoch's
batches the shards are gathered into the model and the optimizer state into full tensors bound to the model
(every rank), and the first step of the next epoch (or ``fit`` call) shards both again from rank 0's values.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .. import context
from ..backends import get_backend
from ..distributed import DistributedError, Plan, check_same_model
from .torch_module import _Sharded, as_torch_module

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
        self.step = None  # the train step of this fit call (wrap)

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

    def end_epoch(self) -> None:
        """A sharded model is gathered back (see the module docstring)."""
        publish = getattr(self.step, "publish", None)
        if publish is not None:
            publish()

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
        self.step = hit[1]
        return hit[1]

    def _make_step(self, model, loss_fn, optimizer, compile, outputs):
        if self.shard and optimizer.torch_class is None:
            raise DistributedError(
                f"fit(parallel=DataParallel(shard_params=True)) on torch steps FSDP2's DTensor shards with the "
                f"optimizer's torch.optim class, and {type(optimizer).__name__} has none (torch_class is None): its "
                "own update rule runs through array functions that DTensor does not support, and a rule that is not "
                "elementwise would be wrong on a shard. Use shard_params=False (DDP), an optimizer with a "
                "torch_class (lm.optim.SGD, Adam, AdamW), or the jax backend")
        eng = optimizer.engine(get_backend(model.backend))
        made: dict = {}
        shard = self.shard

        def make():
            """The wrapper, made at the first step (the model is built by then): the ranks' models are compared
            first, and every rank starts from rank 0's values (DDP broadcasts them; FSDP2 shards them)."""
            self.check(model)
            module = made["module"] = as_torch_module(model)
            if shard:
                from torch.distributed.fsdp import fully_shard

                module._taken = True  # fit keeps the model and the optimizer in step with the shards itself
                wrapped = fully_shard(module)
                made["sharded"] = False  # the model holds the current values until to_shards
            else:
                kwargs = {"device_ids": [module_device(model)]} if dist.get_backend() == "nccl" else {}
                wrapped = torch.nn.parallel.DistributedDataParallel(module, **kwargs)

            def forward_loss(x, y):
                out = wrapped(x)
                return loss_fn(out, y), out

            made["run"] = torch.compile(forward_loss) if compile else forward_loss

        def to_shards():
            """The model's values (rank 0's) into the shards, and the optimizer state with them."""
            module = made["module"]
            module.scatter_from_model()
            eng.rebind(_entries(module, optimizer, True))  # the engine distributes its state (torch.py)
            made["sharded"] = True

        def publish():
            """The shards' values back into the model, and the optimizer state whole, bound to the model."""
            if made.get("sharded"):
                module = made["module"]
                module.gather_into_model()
                eng.rebind(optimizer.entries())  # the engine gathers its state whole (torch.py)
                made["sharded"] = False

        cache = [None, None]

        def step(x, y, lr):
            if not made:
                make()
            if shard and not made["sharded"]:
                to_shards()
                cache[0] = None
            run, module = made["run"], made["module"]
            version = context.structure_version()
            if cache[0] != version:
                cache[:] = [version, _entries(module, optimizer, shard)]
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
        step.publish = publish if shard else None
        return step


def _entries(module, optimizer, shard):
    entries = optimizer.entries()
    if not shard:
        return entries
    params = dict(module.named_parameters())
    return [(k, _Sharded(params[k])) for k, _ in entries]


def module_device(model):
    d = torch.device(model.device)
    return d.index if d.type == "cuda" else None
