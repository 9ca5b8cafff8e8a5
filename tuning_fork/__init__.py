"""tuning_fork: Hydra-configured fine-tuning of LLMs with MLX."""

import ctypes
import os
import sys
from pathlib import Path

__version__ = "0.1.0"


def _fast_cpu_blas() -> None:
    """Let MLX's CPU backend multiply with MKL instead of the reference BLAS its Linux wheel bundles.

    mlx[cpu] on Linux links a reference (netlib) BLAS: ~1 GFLOP/s on a matmul. The `mkl` wheel (installed
    by this project's `cpu` extra on x86-64 Linux) exports the same cblas_* symbols; loaded globally before
    mlx is imported, it wins symbol resolution and training runs ~10x faster. Set TUNING_FORK_BLAS=reference
    to keep the bundled BLAS."""
    if sys.platform != "linux" or "mlx.core" in sys.modules or os.environ.get("TUNING_FORK_BLAS") == "reference":
        return
    for lib in (Path(sys.prefix) / "lib" / "libmkl_rt.so.3", Path(sys.prefix) / "lib" / "libmkl_rt.so.2"):
        if lib.exists():
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass
            return


_fast_cpu_blas()

from .schedule import register_resolvers  # noqa: E402  (launcher subprocesses and sweeps need them too)

register_resolvers()
