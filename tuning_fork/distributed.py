"""Data-parallel runs started by `mlx.launch`: one run, many processes, rank 0 writes.

`mlx.launch` sets MLX_RANK in every process it starts. Every rank trains on its share of each global
batch (data.Batcher) and mlx's step averages the gradients; only rank 0 writes the run folder, shows
progress and talks to W&B. The other ranks learn the run folder from rank 0, so they agree on it even
when Hydra's timestamped folder name would differ between processes started a second apart.
"""

from __future__ import annotations

import os

from .errors import ConfigError


def launched_rank() -> int:
    """This process's rank as mlx.launch set it (0 when not launched): known before anything imports mlx."""
    return int(os.environ.get("MLX_RANK", "0") or 0)


def hydra_overrides_for_followers() -> list[str]:
    """Hydra settings for ranks other than 0: no run folder, log file or saved config of their own."""
    if launched_rank() == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
            "hydra.run.dir=."]


def world():
    import mlx.core as mx

    return mx.distributed.init()


def stream():
    """Where collectives run: NCCL (CUDA) needs the GPU's stream; the ring and MPI backends the CPU's."""
    import mlx.core as mx

    return mx.gpu if mx.cuda.is_available() else mx.cpu


def check_batch(batch_size: int, size: int) -> None:
    if batch_size % size:
        raise ConfigError(f"schedule.batch_size={batch_size} is the global batch and does not split evenly over "
                          f"{size} processes: use a multiple of {size}")


def share_text(group, text: str) -> str:
    """Rank 0's `text`, on every rank."""
    import mlx.core as mx
    import numpy as np

    if group.size() == 1:
        return text
    data = np.zeros(4096, np.int32)
    if group.rank() == 0:
        raw = np.frombuffer(text.encode(), np.uint8)
        data[:len(raw)] = raw
    total = mx.distributed.all_sum(mx.array(data), group=group, stream=stream())
    return bytes(np.array(total).astype(np.uint8)).rstrip(b"\0").decode()


def all_sum(group, value):
    """The sum over ranks of a Python number (integers stay exact)."""
    import mlx.core as mx

    if group.size() == 1:
        return value
    dtype = mx.int64 if isinstance(value, int) else mx.float32
    return mx.distributed.all_sum(mx.array(value, dtype), group=group, stream=stream()).item()


def barrier(group) -> None:
    all_sum(group, 1)
