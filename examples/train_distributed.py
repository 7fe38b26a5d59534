"""Data-parallel training with the same ``lm.fit`` call on torch.distributed or on a jax device mesh.

    torchrun --nproc-per-node 2 examples/train_distributed.py --backend torch           # DDP
    torchrun --nproc-per-node 2 examples/train_distributed.py --backend torch --shard   # FSDP2, own loop
    python examples/train_distributed.py --backend jax --devices 4                      # 4 devices, 1 process
    python examples/train_distributed.py --backend jax --devices 4 --shard              # FSDP-style params

On CPU, jax shows one device unless told otherwise: ``--devices N`` sets XLA_FLAGS before jax starts.
"""

from __future__ import annotations

import argparse
import os


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["torch", "jax"], default="torch")
    ap.add_argument("--devices", type=int, default=None, help="jax: devices to spread the batch over")
    ap.add_argument("--shard", action="store_true", help="shard parameters (torch: FSDP2, jax: FSDP-style)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    if args.backend == "jax" and args.devices and "cuda" not in os.environ.get("JAX_PLATFORMS", ""):
        os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")

    import numpy as np

    import lamina as lm
    from lamina import distributed as ld

    if args.backend == "torch":
        ld.initialize(timeout=120)  # joins the group that torchrun describes (gloo on CPU, nccl on GPUs)
    lm.set_backend(args.backend)
    g = np.random.default_rng(0)
    x = g.normal(size=(4096, 32)).astype("float32")
    y = (x @ g.normal(size=(32, 1)) + 0.1 * g.normal(size=(4096, 1))).astype("float32")
    lm.manual_seed(0)
    model = lm.Sequential(lm.Linear(32, 128), lm.ReLU(), lm.Linear(128, 1))
    model.build((args.batch_size, 32))
    opt = lm.optim.Adam(model, lr=1e-3)

    if args.backend == "torch" and args.shard:
        # your own loop: FSDP2 through the adapter, with torch.optim
        import torch
        from torch.distributed.fsdp import fully_shard

        module = lm.as_torch_module(model)
        fully_shard(module)
        topt = torch.optim.Adam(module.parameters(), lr=1e-3)
        rank, world = ld.rank(), ld.world_size()
        for epoch in range(args.epochs):
            order = np.random.default_rng(epoch).permutation(len(x))
            for idx in ld.shard_order(order, args.batch_size, rank, world):
                topt.zero_grad()
                loss = ((module(torch.from_numpy(x[idx])) - torch.from_numpy(y[idx])) ** 2).mean()
                loss.backward()
                topt.step()
            if ld.is_main():
                print(f"epoch {epoch + 1}: last loss {float(loss):.4f}")
        module.gather_into_model()  # the Lamina model gets the full values back (every rank calls it)
    else:
        parallel = None
        if args.backend == "jax":
            parallel = ld.DataParallel(devices=args.devices or "all", shard_params=args.shard)
        h = lm.fit(model, lm.losses.mse, opt, (x, y), epochs=args.epochs, batch_size=args.batch_size,
                   validation_data=(x[:512], y[:512]), parallel=parallel, progress=False)
        if ld.is_main():
            for e, (lo, vl) in enumerate(zip(h["loss"], h["val_loss"])):
                print(f"epoch {e + 1}: loss {lo:.4f}  val_loss {vl:.4f}")
    ld.save_sharded(model, "distributed-ckpt")
    if ld.is_main():
        print("sharded checkpoint in distributed-ckpt/ (loads into any number of processes)")
    if args.backend == "torch":
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
