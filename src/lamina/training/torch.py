"""Training on torch: an eager (or ``torch.compile``d) step with ``loss.backward()``, and the optimizers.

An optimizer that names a ``torch_class`` runs as that ``torch.optim`` class, with torch's arithmetic:
the fused kernel where the device has one and it agrees with torch's default kernel within
1e-6 (checked once per device, class and hyperparameters, below; on CPU, Adam's fused update is 3x faster
than foreach on a 784-512-512-10 MLP and differs from the default by float32 rounding, about 6e-8 after
100 steps: the same tolerance the jax backend keeps against torch.optim), else the multi-tensor (foreach)
kernels, which on CPU are much faster than the per-tensor loop that ``torch.optim.Adam`` runs by default.
Any other optimizer runs its own ``update`` rule eagerly, under ``torch.no_grad``, writing the new values
into the parameters' tensors.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch.optim import optimizer as _hooks

from .. import context
from ..backends import get_backend
from .base import call, input_leaves, map_inputs, only_held_by, pack_state

__all__ = ["make_step", "engine", "make_forward"]


def make_step(model, loss_fn, optimizer, compile, outputs=True):
    """``step(x, y, lr) -> (loss, out)``; see ``training/base.py``."""
    eng = optimizer.engine(get_backend(model.backend))

    def forward_loss(x, y):
        out = call(model, x)
        return loss_fn(out, y), out

    run = torch.compile(forward_loss) if compile else forward_loss
    cache = [None, None]  # structure version, entries: the parameter list is rebuilt only when it changed
    pool: dict = {}  # (input slot, shape, dtype) -> host buffers of gathered rows, reused (see _gather)

    def step(x, y, lr):
        version = context.structure_version()
        if cache[0] != version:
            cache[:] = [version, optimizer.entries()]
        entries = cache[1]
        for _, p in entries:
            p.grad = None
        loss, out = run(x, y)
        loss.backward()
        eng.step(entries, None, lr)
        return loss.detach(), (out.detach() if outputs else None)

    def epoch(x, y, order, batch_size, k, lr_at, start, sync, each=True):
        """One epoch over the arrays ``x`` (an array, or a tuple or dict of arrays) and ``y``: each is made
        a tensor once (NumPy float32 memory is shared, not copied). Shuffled rows are gathered once
        per chunk of about ``GATHER_BYTES`` (one gather per batch costs more; one for the
        whole epoch would copy all the data at once), and each batch is a view of its chunk. Yields
        ``(loss, out, rows, 1, targets)`` per step, as ``fit``'s loop."""
        data = [map_inputs(tensor, x), map_inputs(tensor, y)]
        n = int(data[1].shape[0])
        index = None
        if order is not None:
            index = torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64))
            if index.device != data[1].device:
                index = index.to(data[1].device)
        row_bytes = sum(a[:1].nbytes for d in data for a in input_leaves(d)) or 1
        chunk = batch_size * max(1, GATHER_BYTES // (row_bytes * batch_size))
        j = 0
        for c0 in range(0, n, chunk):
            if index is None:
                xs, ys = (map_inputs(lambda a, c0=c0: a[c0:c0 + chunk], d) for d in data)
            else:
                rows, slots = index[c0:c0 + chunk], itertools.count()  # slot: which input array
                xs, ys = (map_inputs(lambda a, rows=rows, slots=slots: _gather(a, rows, pool, next(slots)), d)
                          for d in data)
            for lo in range(0, int(ys.shape[0]), batch_size):
                hi = lo + batch_size
                xb = xs[lo:hi] if isinstance(xs, torch.Tensor) else map_inputs(lambda a, lo=lo, hi=hi: a[lo:hi], xs)
                yb = ys[lo:hi]
                loss, out = step(xb, yb, lr_at(start + j))
                j += 1
                yield loss, out, int(yb.shape[0]), 1, yb

    def tensor(a):
        """An epoch array as a tensor on the model's device: NumPy float32 and integer memory shared."""
        if type(a) is np.ndarray and a.dtype.kind in "biuf":
            if a.dtype == np.float64:
                a = a.astype(np.float32)
            return get_backend(model.backend).from_numpy(a, model.device, copy=False)
        return model.convert_inputs(a)[0]

    step.many = None
    step.group = lambda x: 1
    step.epoch = epoch
    return step


#: fit's epoch gathers shuffled rows in chunks of about this many bytes (see ``epoch``)
GATHER_BYTES = 32 << 20


def _gather(a, rows, pool: dict, slot: int):
    """The rows ``rows`` of ``a``: on the CPU written by ``index_select`` (on torch's threads: 2x NumPy's
    gather on 2 cores, 222 vs 472 us for the MLP's 4,096 x 784 epoch) into a host buffer of ``pool`` that
    no tensor uses any more (writing into memory used before saves the page faults of a fresh array: 2% of
    an epoch of the 784-512-512-10 MLP); elsewhere (or for a dtype NumPy lacks) into a new tensor. A buffer
    is free when its reference count says that no tensor (a batch a forward kept, say) holds it: a tensor
    made by ``torch.from_numpy`` holds its array."""
    if a.device.type == "cpu" and rows.device.type == "cpu" and not a.requires_grad:
        try:
            dtype = a.numpy().dtype
        except TypeError:  # bfloat16 and other dtypes NumPy does not have
            return a.index_select(0, rows)
        shape = (int(rows.shape[0]), *a.shape[1:])
        bufs = pool.setdefault((slot, shape, dtype), [])
        buf = next((b for b in bufs if only_held_by(1, b)), None)  # (1: the pool's list)
        if buf is None:
            buf = np.empty(shape, dtype)
            if len(bufs) < 2:  # the epoch's chunk and the last one (its last batch may still be held)
                bufs.append(buf)
        out = torch.from_numpy(buf)
        torch.index_select(a, 0, rows, out=out)
        return out
    return a.index_select(0, rows)


def engine(optimizer, backend):
    """The eager engine of ``optimizer`` on torch (see ``training/base.py``)."""
    if optimizer.torch_class is not None:
        return _TorchOptim(optimizer, backend)
    return _Generic(optimizer, backend)


# Whether torch's fused kernel gives the default kernel's updates within FUSED_TOLERANCE, per class, device
# type and hyperparameters: checked once on a small problem over 20 steps; fused is used only where the
# kernel exists and agrees.
FUSED_TOLERANCE = 1e-6
_FUSED_OK: dict = {}


def _fused_agrees(cls, kwargs: dict, device) -> bool:
    key = (cls.__name__, device.type, tuple(sorted((k, str(v)) for k, v in kwargs.items() if k != "lr")))
    if key not in _FUSED_OK:
        ok = False
        if cls.__name__ in ("Adam", "AdamW"):
            try:
                g = torch.Generator().manual_seed(0)
                w0 = torch.randn(37, 5, generator=g).to(device)
                grads = [torch.randn(37, 5, generator=g).to(device) for _ in range(20)]
                results = []
                for extra in ({"foreach": False}, {"fused": True}):
                    w = torch.nn.Parameter(w0.clone())
                    opt = cls([w], **{**kwargs, "lr": 0.01}, **extra)
                    for gr in grads:
                        w.grad = gr.clone()
                        opt.step()
                    results.append(w.detach().clone())
                ok = bool((results[0] - results[1]).abs().max() <= FUSED_TOLERANCE)
            except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
                ok = False
        _FUSED_OK[key] = ok
    return _FUSED_OK[key]


class _TorchOptim:
    """An ``lm.optim`` optimizer as its ``torch.optim`` class over the parameters' tensors: the model's own, or
    FSDP2's ``DTensor`` shards of them (``fit``'s FSDP2 path, ``training/torch_module.py``'s ``shard_entries``),
    with the state laid out as the parameters (a shard each)."""

    def __init__(self, optimizer, backend):
        self.backend = backend
        self.optimizer = optimizer
        self.cls = getattr(torch.optim, optimizer.torch_class)
        self.opt = None
        self.tensors: list = []  # the parameters' tensors, as the model holds them
        self.stepped: list = []  # what torch.optim steps: each tensor, or its contiguous transpose (see _memory)
        self.transposed: list = []  # (tensor, its transpose) where the two differ
        self.names: list = []
        self.count = 0  # updates done (torch's SGD keeps no count of its own)
        self.kernel = None  # the fused kernel's call, once torch.optim made the state (see _kernel)

    def __getstate__(self):
        # (copy.deepcopy((model, opt)) would share the kernel, a closure over this engine's tensors: none in a copy)
        return {**self.__dict__, "kernel": None}

    def _bind(self, entries, carry=True):
        """(Re)create the torch optimizer when the parameter tensors changed (first step, model.to(), FSDP2
        shards in place of the full tensors or back, ...), carrying the state over by path (``carry``): moved
        onto shards it is distributed from rank 0's values, moved off them it is gathered whole, which are
        collectives that every rank runs."""
        tensors = [p.value for _, p in entries]
        if self._binds(tensors):
            return
        carried = self._export() if self.opt is not None and carry else {}
        kwargs = self.optimizer.torch_kwargs()
        fast = {"foreach": True}
        if tensors and all(t.dtype == torch.float32 for t in tensors) and _fused_agrees(self.cls, kwargs,
                                                                                         tensors[0].device):
            fast = {"fused": True}
        self.tensors, self.stepped, self.names = tensors, [_memory(t) for t in tensors], [k for k, _ in entries]
        self.transposed = [(t, s) for t, s in zip(tensors, self.stepped) if s is not t]
        self.opt = self.cls(self.stepped, **kwargs, **fast)
        self.kernel = None
        if carried:
            self._import(carried)

    def _binds(self, tensors) -> bool:
        # (a transposed view must still be the memory of its tensor: copy.deepcopy((model, opt)) gives the
        # copied view memory of its own, which no model holds)
        return (self.opt is not None and len(tensors) == len(self.tensors)
                and all(a is b for a, b in zip(tensors, self.tensors))
                and all(s.data_ptr() == t.data_ptr() for t, s in self.transposed))

    def _check_whole(self, entries) -> None:
        """The state leaves the engine whole only from ``gather_into_model`` (every rank at once), never by
        gathering in ``state_dict`` (one rank alone would wait for the others until the timeout)."""
        if (self.opt is not None and any(_sharded(t) for t in self.tensors)
                and (entries is None or not self._binds([p.value for _, p in entries]))):
            name = type(self.optimizer).__name__
            raise ValueError(f"{name}'s state is sharded with the FSDP2 module's parameters (it last stepped their "
                             "DTensor shards): call module.gather_into_model() on every rank first (it gathers the "
                             f"parameters into the model and the state of {name} whole), then state_dict() or "
                             "lm.save(model, path, optimizer=opt), on any rank")

    def step(self, entries, grads, lr):
        self._bind(entries)  # (a no-op while the tensors are those it stepped)
        if grads is not None:  # (autograd's own gradients are laid out as their parameters already)
            for (k, _), t in zip(entries, self.tensors):
                g = grads[k]  # (opt.step() after backward passes each .grad: one set by hand may be laid out unlike it)
                if (isinstance(g, torch.Tensor) and g.stride() != t.stride() and g.shape == t.shape
                        and g.dtype == t.dtype and g.device == t.device and not _sharded(t)):
                    # torch's fused Adam reads a gradient as laid out like its parameter (torch 2.13, CPU:
                    # silently wrong updates otherwise); anything else unlike it gets torch's own error
                    g = torch.empty_like(t).copy_(g)
                if t.grad is not g:
                    t.grad = g
        for t, s in self.transposed:  # the gradient of a column-major weight, seen as its memory's
            g = t.grad
            if g is not None:
                g = g.t()
                if g.stride() != s.stride():  # a gradient set by hand (p.grad = ...) in row-major memory
                    g = g.contiguous()
            s.grad = g
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.kernel is None or not self.kernel(lr):
            self.opt.step()
            self.kernel = _kernel(self.opt)
        for _, s in self.transposed:  # not kept: fit drops the parameters' gradients before each step, and
            s.grad = None             # a view kept here would hold a second set of them through the next backward
        self.count += 1

    def rebind(self, entries) -> None:
        """Bind to ``entries``, carrying the state over: gathered whole off DTensor shards, or distributed onto
        them (collectives: every rank calls it, in the same order)."""
        self._bind(entries)

    def _export(self):
        out = {}
        slots = self.optimizer.slots
        for name, t, s in zip(self.names, self.tensors, self.stepped):
            st = self.opt.state.get(s, {})
            for slot in slots:
                v = st.get(slot)
                if isinstance(v, torch.Tensor):
                    out[f"{name}/{slot}"] = (v if s is t else v.t()).detach().clone()  # (shaped as the parameter)
                else:
                    out[f"{name}/{slot}"] = torch.zeros_like(t)
            step = st.get("step")
            if step is None:  # SGD keeps no count in its state: the engine's
                step = self.count
            out[f"{name}/step"] = torch.tensor(float(step), dtype=torch.float32)
        return out

    def _import(self, arrays):
        self.opt.state.clear()
        self.kernel = None
        if not arrays:
            self.count = 0
            return
        fused = bool(self.opt.defaults.get("fused"))
        count = next((float(v.reshape(-1)[0]) for k, v in arrays.items() if k.endswith("/step")), float(self.count))
        for name, t, s in zip(self.names, self.tensors, self.stepped):
            st = self.opt.state[s]
            if f"{name}/step" not in arrays:  # a parameter that joined (made trainable again): zero moments and
                arrays = {**arrays, f"{name}/step": torch.tensor(count),  # the shared count, as on jax
                          **{f"{name}/{slot}": torch.zeros_like(t) for slot in self.optimizer.slots}}
            step = float(arrays[f"{name}/step"].reshape(-1)[0])
            self.count = int(step)
            if "step" in _STEPPED.get(self.optimizer.torch_class, ()):
                # 'step' stays a float32 scalar on the CPU, as torch.optim keeps it (fused: on the device)
                st["step"] = torch.tensor(step, dtype=torch.float32, device=t.device if fused else "cpu")
            for slot in self.optimizer.slots:
                v = arrays[f"{name}/{slot}"]
                v = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.array(v))
                if slot == "momentum_buffer" and step == 0:
                    continue  # torch starts the buffer from the first gradient
                st[slot] = _laid_out_as(v if s is t else v.t(), s)

    def state_dict(self, entries):
        self._check_whole(entries)
        self._bind(entries)
        return self._export()

    def export(self) -> dict:
        """The state as host arrays, without entries (the parameters may have left this backend)."""
        self._check_whole(None)
        return {} if self.opt is None else {k: v.detach().cpu().numpy() for k, v in self._export().items()}

    def load_state_dict(self, entries, arrays):
        self._bind(entries, carry=False)
        self._import(arrays)


def _memory(t):
    """What torch.optim steps for parameter tensor ``t``: ``t`` itself, or for a matrix stored transposed (a
    ``Linear`` weight (in, out) kept in torch.nn.Linear's (out, in) memory, see ``backends/torch.py``) the
    contiguous transpose of the same memory: the fused Adam is 3x slower on the strided view (452 vs 157 us
    for the 784-512-512-10 MLP's parameters)."""
    if t.ndim == 2 and not t.is_contiguous() and t.t().is_contiguous() and not _sharded(t):
        return t.detach().t()
    return t


def _sharded(t) -> bool:
    """Whether ``t`` is a ``DTensor`` (FSDP2's shard of a parameter)."""
    return hasattr(t, "full_tensor")


def _laid_out_as(v, t):
    """A copy of state value ``v`` laid out as parameter ``t``: whole for a plain tensor (gathered from a
    ``DTensor``), in ``t``'s memory order (torch's fused Adam reads its moments as laid out like the parameter,
    and silently updates wrong otherwise); as ``t``'s shards of rank 0's values for a ``DTensor`` (distributed;
    kept as it is where ``v`` is sharded as ``t`` already). Gathering and distributing are collectives that
    every rank runs."""
    if _sharded(t):
        if _sharded(v) and v.device_mesh == t.device_mesh and v.placements == t.placements:
            return v.to(dtype=t.dtype).clone()
        from torch.distributed.tensor import distribute_tensor

        whole = v.full_tensor() if _sharded(v) else v
        return distribute_tensor(whole.detach().to(device=t.device, dtype=t.dtype), t.device_mesh, t.placements)
    whole = v.full_tensor() if _sharded(v) else v
    return torch.empty_like(t, requires_grad=False).copy_(whole.detach())


def _kernel(opt):
    """``step(lr) -> bool``: what ``opt.step()`` does for a fused Adam or AdamW (torch 2.13's ``_fused_adam``
    over one device and dtype), calling torch's fused kernel itself on lists made once: torch.optim's Python
    around the kernel, ~30 us a step, was a quarter of the tiny model's step (Linear(64, 8) -> Linear(8, 1)).
    False (nothing done) where a parameter has no gradient or an optimizer hook is registered (hooks run in
    ``opt.step()`` only); None where ``opt`` is not such an optimizer or its state is not made for every
    parameter yet."""
    if not opt.defaults.get("fused") or len(opt.param_groups) != 1 or type(opt) not in (torch.optim.Adam,
                                                                                        torch.optim.AdamW):
        return None
    group = opt.param_groups[0]
    params = list(group["params"])
    states = [opt.state.get(p) for p in params]
    if (not params or any(not st for st in states) or group["amsgrad"] or group["capturable"] or group["differentiable"]
            or len({(p.device, p.dtype) for p in params}) != 1 or any(map(_sharded, params)) or _optimizer_hooks(opt)):
        return None
    slots = [[st[k] for st in states] for k in ("exp_avg", "exp_avg_sq", "step")]
    if any(v.device != params[0].device for v in slots[2]):
        return None
    exp_avgs, exp_avg_sqs, steps = slots
    func = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
    beta1, beta2 = (float(b) for b in group["betas"])
    weight_decay, eps, maximize = group["weight_decay"], group["eps"], group["maximize"]

    def step(lr) -> bool:
        grads = [p.grad for p in params]
        if any(g is None for g in grads) or _optimizer_hooks(opt):  # (not ``None in``: a tensor's == costs 10 us)
            return False
        with torch.no_grad():
            torch._foreach_add_(steps, 1)
            func(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                 weight_decay=weight_decay, eps=eps, maximize=maximize, grad_scale=None, found_inf=None)
        return True

    return step


def _optimizer_hooks(opt) -> bool:
    return bool(_hooks._global_optimizer_pre_hooks or _hooks._global_optimizer_post_hooks
                or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks)


_STEPPED = {"Adam": ("step",), "AdamW": ("step",)}  # torch classes that keep an update count in their state


class _Generic:
    """An optimizer's own ``update`` rule, run eagerly on the parameters' tensors."""

    def __init__(self, optimizer, backend):
        self.backend = backend
        self.optimizer = optimizer
        self.state: dict = {}  # path -> {slot: tensor}
        self.count = 0

    def _state_of(self, k, t):
        st = self.state.get(k)
        if st is None:
            st = self.state[k] = {s: torch.zeros_like(t) for s in self.optimizer.slots}
        return st

    def step(self, entries, grads, lr):
        opt = self.optimizer
        scalars = [float(v) for v in opt.scalars(lr, self.count + 1)]
        xp = self.backend.xp
        with torch.no_grad():
            for k, p in entries:
                t = p.value
                g = t.grad if grads is None else grads[k]
                new, self.state[k] = opt.update(t.detach(), g, self._state_of(k, t), scalars, xp)
                t.copy_(new)  # in place: whoever holds the tensor (torch.optim, hooks) sees the update
        self.count += 1

    def export(self) -> dict:
        """The state as host arrays, without entries (the parameters may have left this backend)."""
        out = {}
        for k, st in self.state.items():
            out.update({f"{k}/{s}": v.detach().cpu().numpy() for s, v in st.items()})
            out[f"{k}/step"] = np.float32(self.count)
        return out

    def state_dict(self, entries):
        slots = self.optimizer.slots
        return pack_state({k: {s: self._state_of(k, p.value)[s].detach().clone() for s in slots} for k, p in entries},
                          slots, torch.tensor(float(self.count), dtype=torch.float32))

    def load_state_dict(self, entries, arrays):
        if not arrays:
            self.state, self.count = {}, 0
            return
        new = {}
        for k, p in entries:
            t = p.value
            new[k] = {s: torch.as_tensor(np.array(arrays[f"{k}/{s}"])).to(device=t.device, dtype=t.dtype)
                      for s in self.optimizer.slots}
        self.state = new
        self.count = int(np.asarray(arrays[f"{entries[0][0]}/step"]).reshape(-1)[0]) if entries else 0


def make_forward(model):
    """``forward(*args, **kwargs)``: ``model`` through ``torch.compile``. The parameters are read from the
    model on every call (dynamo guards on them), so later updates are seen; NumPy inputs are converted."""
    compiled = torch.compile(model)

    def forward(*args, **kwargs):
        args = model.convert_inputs(*args)
        model.ensure_built(*args, **kwargs)
        return compiled(*args, **kwargs)

    forward.compiled = compiled
    return forward
