"""What every app entrypoint shares: bad input is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import sys

from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from .errors import TuningForkError


def run_app(fn, cfg):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return fn(cfg)
    except MissingMandatoryValue as e:
        fail(f"{e.full_key} is not set: add {e.full_key}=<value> to the command line")
    except TuningForkError as e:
        fail(str(e), getattr(e, "exit_code", 2))
    except InterpolationResolutionError as e:  # a resolver (tf.plan) found bad input
        head = str(e).splitlines()[0]
        for kind in ("ConfigError", "DataError"):
            if head.startswith(f"{kind} raised while resolving interpolation: "):
                fail(head.split(": ", 1)[1])
        raise
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which stops cleanly by itself): 128 + SIGINT
        fail("interrupted", 130)


def fail(message: str, code: int = 2) -> None:
    """In a multirun, raise so the sweeper records this job as failed; otherwise print one line and exit."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise TuningForkError(message)
    from .distributed import launched_rank

    rank = launched_rank()  # under mlx.launch every rank may report the same error: say whose line it is
    print(f"tuning_fork: error{f' (rank {rank})' if rank else ''}: {message}", file=sys.stderr)
    sys.exit(code)


def command_error(command: str, message: str) -> int:
    """The one-line error of a plain (argparse) command such as tuning_fork.plot; returns its exit code."""
    print(f"{command}: error: {message}", file=sys.stderr)
    return 2
