"""Data-parallel training with the same ``lm.fit`` call on torch.distributed or on jax (devices or processes).

    torchrun --nproc-per-node 2 examples/train_distributed.py --backend torch             # DDP
    torchrun --nproc-per-node 2 examples/train_distributed.py --backend torch --shard     # FSDP2
    torchrun --nproc-per-node 2 examples/train_distributed.py --backend torch --own-loop  # DDP, lm.optim, own loop
    python examples/train_distributed.py --backend jax --devices 4                        # 4 devices, 1 process
    python examples/train_distributed.py --backend jax --devices 4 --shard                # FSDP-style params
    python examples/train_distributed.py --backend jax --processes 2 --process-id 0 &     # 2 jax processes
    python examples/train_distributed.py --backend jax --processes 2 --process-id 1

On CPU, jax shows one device unless told otherwise: ``--devices N`` sets XLA_FLAGS before jax starts.
"""

from __future__ import annotations

import argparse
import os


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["torch", "jax"], default="torch")
    ap.add_argument("--devices", type=int, default=None, help="jax: devices to spread the batch over")
    ap.add_argument("--processes", type=int, default=None, help="jax: join this many processes")
    ap.add_argument("--process-id", type=int, default=0, help="jax: this process's index")
    ap.add_argument("--coordinator", default="127.0.0.1:12355", help="jax: process 0's host:port")
    ap.add_argument("--shard", action="store_true", help="shard parameters (torch: FSDP2, jax: FSDP-style)")
    ap.add_argument("--own-loop", action="store_true", help="torch: your own loop through lm.as_torch_module")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64, help="per process (one jax process: the global batch)")
    args = ap.parse_args()
    if args.backend == "jax" and args.devices and "cuda" not in os.environ.get("JAX_PLATFORMS", ""):
        os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")

    import numpy as np

    import lamina as lm
    from lamina import distributed as ld

    if args.backend == "torch":
        ld.initialize(timeout=120)  # joins the group that torchrun describes (gloo on CPU, nccl on GPUs)
    elif args.processes:  # jax's processes, with Lamina's timeouts (a process that dies stops the others)
        ld.initialize(timeout=120, framework="jax", coordinator_address=args.coordinator,
                      num_processes=args.processes, process_id=args.process_id)
    lm.set_backend(args.backend)
    g = np.random.default_rng(0)
    x = g.normal(size=(4096, 32)).astype("float32")
    y = (x @ g.normal(size=(32, 1)) + 0.1 * g.normal(size=(4096, 1))).astype("float32")
    lm.manual_seed(0)
    model = lm.Sequential(lm.Linear(32, 128), lm.ReLU(), lm.Linear(128, 1))
    model.build((args.batch_size, 32))
    opt = lm.optim.Adam(model, lr=1e-3)

    if args.backend == "torch" and args.own_loop:
        import torch

        module = lm.as_torch_module(model)  # a torch.nn.Module sharing the model's tensors
        if args.shard:  # FSDP2: the module trains DTensor shards; opt.step steps those (torch.optim would too)
            from torch.distributed.fsdp import fully_shard

            fully_shard(module)
            forward = module
        else:  # DDP shares the model's tensors: opt.step updates them in place
            forward = torch.nn.parallel.DistributedDataParallel(module)
        rank, world = ld.rank(), ld.world_size()
        for epoch in range(args.epochs):
            order = np.random.default_rng(epoch).permutation(len(x))
            for idx in ld.shard_order(order, args.batch_size, rank, world):
                loss = ((forward(torch.from_numpy(x[idx])) - torch.from_numpy(y[idx])) ** 2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
            if ld.is_main():
                print(f"epoch {epoch + 1}: last loss {float(loss.detach()):.4f}")
        module.gather_into_model()  # after fully_shard: the model and opt's state whole again (every rank calls it)
    else:
        parallel = None  # torch under torchrun: DDP by itself
        if args.backend == "jax" or args.shard:
            parallel = ld.DataParallel(devices=args.devices or "all", shard_params=args.shard)
        several_jax = args.backend == "jax" and ld.world_size() > 1  # validation: one process only, for now
        h = lm.fit(model, lm.losses.mse, opt, (x, y), epochs=args.epochs, batch_size=args.batch_size,
                   validation_data=None if several_jax else (x[:512], y[:512]), parallel=parallel, progress=False)
        if ld.is_main():
            for e, lo in enumerate(h["loss"]):
                print(f"epoch {e + 1}: loss {lo:.4f}" + ("" if several_jax else f"  val_loss {h['val_loss'][e]:.4f}"))
    ld.save_sharded(model, "distributed-ckpt")
    if ld.is_main():
        print("sharded checkpoint in distributed-ckpt/ (loads into any number of processes)")


if __name__ == "__main__":
    main()
