"""The all-reduce of a LoRA step's gradients alone, in MLX (mx.distributed.all_sum, NCCL) and in PyTorch
(torch.distributed, NCCL), on the same GPUs: is a two-GPU step's shortfall MLX's all-reduce or the machine's link?

    mlx.launch -n 2 --backend nccl -- python benchmarks/allreduce.py mlx 45 168
    torchrun --nproc_per_node 2 benchmarks/allreduce.py torch 45 168
Float32 arrays of each size in MB (45: Llama-1B's LoRA r16 gradients on every linear, 168: 8B's), 5 warm-ups
then 20 timed; rank 0 prints one `RESULT {json}` line per size (algorithm bandwidth: bytes / time).
"""

from __future__ import annotations

import json
import sys
import time

RUNS, WARMUP = 20, 5


def main():
    try:
        lib, sizes = sys.argv[1], [float(s) for s in sys.argv[2:]]
        assert lib in ("mlx", "torch") and sizes
    except (IndexError, ValueError, AssertionError):
        sys.exit("usage: allreduce.py {mlx|torch} MB [MB ...]")
    if lib == "mlx":
        import mlx.core as mx

        group = mx.distributed.init()
        rank, make = group.rank(), lambda n: mx.ones((n,), mx.float32)
        reduce = lambda a: mx.eval(mx.distributed.all_sum(a))
        sync = mx.synchronize
    else:
        import os

        import torch
        import torch.distributed as dist

        dist.init_process_group("nccl")
        rank = dist.get_rank()
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        make = lambda n: torch.ones(n, dtype=torch.float32, device="cuda")
        reduce = dist.all_reduce
        sync = torch.cuda.synchronize
    for mb in sizes:
        a = make(int(mb * 2**20 / 4))
        for _ in range(WARMUP):
            reduce(a)
        sync()
        tic = time.perf_counter()
        for _ in range(RUNS):
            reduce(a)
        sync()
        dt = (time.perf_counter() - tic) / RUNS
        if rank == 0:
            print("RESULT " + json.dumps(dict(lib=lib, mb=mb, ms=dt * 1e3, algbw_gb_s=mb * 2**20 / dt / 1e9)), flush=True)


if __name__ == "__main__":
    main()
