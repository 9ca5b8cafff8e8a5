"""Checkpoints that resume exactly, and stopping cleanly on Ctrl-C or SIGTERM.

A checkpoint at step N is two things, each written to a temporary name and renamed into place:
- `adapters/NNNNNNN_adapters.safetensors`: the trainable weights, under mlx-lm's name;
- `checkpoints/NNNNNNN/`: what resuming needs besides them: `optimizer.safetensors` (the optimizer's state)
  and `state.json` (steps done, the open report window, W&B run id, the resolved config). The batcher's
  position is the step count (its order is a function of seed and epoch), and the random generator is
  seeded from the seed and the step before every step, so neither needs saving.
Only then is `adapters/adapters.safetensors` replaced by the new weights. A crash at any moment leaves
the previous checkpoint whole; a checkpoint counts only once its folder exists (`latest`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import models
from .distributed import launched_rank
from .errors import ConfigError, TuningForkError
from .evaluation import Best

NUMBERED = "[0-9]" * 7


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Window:
    """The open report window: what the steps since the last training report add up to."""

    loss: float = 0.0
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)  # the objective's metrics, summed over the window's steps


@dataclass
class TrainState:
    """Where a run is: saved in every checkpoint's state.json, restored by resume=true."""

    step: int = 0  # optimizer steps (iterations) done
    trained_tokens: int = 0
    window: Window = field(default_factory=Window)
    wandb_id: str | None = None
    config: dict = field(default_factory=dict)  # the resolved config: a resume must use the same
    best: Best = field(default_factory=Best)  # the monitored metric's best value, and early stopping's count
    stopped_early: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TrainState":
        window = d.get("window") or {}
        window = Window(*window) if isinstance(window, list) else Window(**window)  # (a list before 0.2)
        best = Best(**d["best"]) if d.get("best") else Best()
        return cls(step=d["step"], trained_tokens=d.get("trained_tokens", 0), window=window,
                   wandb_id=d.get("wandb_id"), config=d.get("config", {}), best=best,
                   stopped_early=d.get("stopped_early", False))


class Checkpoints:
    def __init__(self, run_dir: Path, keep: int | None = None):
        self.adapters = run_dir / "adapters"
        self.folder = run_dir / "checkpoints"
        self.keep = keep
        self.last: int | None = None

    def save(self, done: int, model, optimizer, state: TrainState) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        if self.last == done:
            return
        weights = models.save_adapters(model, self.adapters, f"{done:07d}_adapters.safetensors")
        self.folder.mkdir(exist_ok=True)
        tmp = self.folder / f".{done:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        from .step import per_parameter_state

        arrays = {f"optimizer.{k}": v for k, v in tree_flatten(per_parameter_state(model, optimizer))}
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), arrays)
        (tmp / "state.json").write_text(json.dumps({**state.to_json(), "step": done}, indent=1))
        for f in (weights, tmp / "optimizer.safetensors", tmp / "state.json"):
            _fsync(f)
        final = self.folder / f"{done:07d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest = self.adapters / ".adapters.safetensors.tmp"
        shutil.copyfile(weights, latest)
        os.replace(latest, self.adapters / "adapters.safetensors")
        self.last = done
        self._prune()

    def _prune(self) -> None:
        if not self.keep:
            return
        for old in sorted(self.folder.glob(NUMBERED))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
            (self.adapters / f"{old.name}_adapters.safetensors").unlink(missing_ok=True)
        kept = {p.name for p in self.folder.glob(NUMBERED)}
        for stray in self.adapters.glob(f"{NUMBERED}_adapters.safetensors"):
            if stray.name[:7] not in kept:
                stray.unlink()  # from a save that crashed before its state was written, or pruned

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None."""
        for folder in sorted(self.folder.glob(NUMBERED), reverse=True):
            if (folder / "state.json").exists() and (self.adapters / f"{folder.name}_adapters.safetensors").exists():
                return folder
        return None

    def save_best(self, model) -> Path:
        """The adapters of the best validation so far: adapters/best/, a folder mlx_lm.load takes as
        adapter_path (its adapter_config.json is the run's). Each file is renamed into place."""
        folder = self.adapters / "best"
        models.save_adapters(model, folder)
        tmp = folder / ".adapter_config.json.tmp"
        shutil.copyfile(self.adapters / "adapter_config.json", tmp)
        os.replace(tmp, folder / "adapter_config.json")
        return folder

    def restore(self, folder: Path, model, optimizer) -> TrainState:
        """Load a checkpoint's weights and optimizer state; return its state. (The random generator
        needs nothing: the loop seeds it from the seed and the step before every step.)"""
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        model.load_weights(str(self.adapters / f"{folder.name}_adapters.safetensors"), strict=False)
        arrays = mx.load(str(folder / "optimizer.safetensors"))
        optimizer.state = tree_unflatten([(k[len("optimizer."):], v) for k, v in arrays.items()])
        state = TrainState.from_json(json.loads((folder / "state.json").read_text()))
        self.last = state.step
        return state


# ------------------------------------------------------------------------------------------ resume policy


def find_resume(cfg, run_dir: Path, checkpoints: Checkpoints) -> Path | None:
    """The checkpoint to continue from (resume=true), or None for a new run; never a new run over an old one."""
    if cfg.resume:
        if (run_dir / "results.json").exists() and not (run_dir / "results.json").read_text().count('"pruned"'):
            raise ConfigError(f"resume=true: {run_dir} holds a finished run (results.json): nothing to resume")
        latest = checkpoints.latest()
        if latest is None:
            raise ConfigError(f"resume=true: {run_dir} holds no checkpoint ({checkpoints.folder.name}/ is empty "
                              "or missing): start the run without resume=true, or point hydra.run.dir at "
                              "the interrupted run's folder")
        return latest
    for name in ("adapters/adapters.safetensors", "metrics.jsonl", "checkpoints"):
        if (run_dir / name).exists():
            raise ConfigError(f"{run_dir} already holds a run ({name}): add resume=true to continue it, or "
                              "choose a new hydra.run.dir (or move that folder away)")
    return None


IGNORED_ON_RESUME = ("resume", "output_dir", "wandb")
# Settings that only recompute what was there: a run that ran out of memory resumes with checkpointing on.
RECOMPUTE_ONLY = ("schedule.grad_checkpoint", "schedule.checkpoint_part", "schedule.checkpoint_layers")


def check_same_config(saved: dict, now: dict, folder: Path) -> None:
    """A resumed run must be the run that stopped: same model, data, schedule and adapter (what the backward pass
    recomputes, RECOMPUTE_ONLY, may change)."""

    def walk(a, b, prefix=""):
        for key in sorted(set(a) | set(b)):
            path = f"{prefix}{key}"
            if not prefix and key in IGNORED_ON_RESUME or key not in a or path in RECOMPUTE_ONLY:
                continue  # (key not in a: a setting newer than the saved run)
            x, y = a.get(key), b.get(key)
            if isinstance(x, dict) and isinstance(y, dict):
                walk(x, y, path + ".")
            elif x != y:
                raise ConfigError(f"resume=true: {path}={y!r}, but the interrupted run used {path}={x!r} "
                                  f"({folder}/state.json): resume with the same settings")

    walk(saved, now)


class StopSignals:
    """While active, the first SIGINT or SIGTERM asks the run to stop after the current step (it then
    checkpoints and exits); a second one exits at once. Everything already on disk is whole either way,
    because every file is written under a temporary name and renamed."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.signal is not None:
            print(f"\ntuning_fork: stopped at once ({signal.Signals(signum).name}); the last checkpoint is intact",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal = signum
        print(f"\ntuning_fork: {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(press Ctrl-C again to quit now)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        if self.signal is None:  # once stopping, a second signal still means "now", until the process ends
            for s, handler in self._old.items():
                signal.signal(s, handler)
        return False


class Interrupted(TuningForkError):
    """A signal stopped the run after a checkpoint: the message says how to resume; the exit code is 128+signal."""

    def __init__(self, signum: int, done: int, iters: int, run_dir: Path):
        self.exit_code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name} stopped the run at iteration {done} of {iters}; a "
                         f"checkpoint is saved. Resume with: {resume_command(run_dir)}")


def resume_command(run_dir: Path) -> str:
    """The command that continues this run: the same overrides, in the same folder, with resume=true."""
    import shlex

    overrides = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            overrides = [o for o in HydraConfig.get().overrides.task
                         if not o.startswith(("hydra.run.dir=", "resume="))]
            if launched_rank() == 0:
                run_dir = Path(HydraConfig.get().runtime.output_dir)  # a pipeline's folder, not its stage's
    except Exception:  # not under Hydra (a test calling train directly): the folder says enough
        pass
    return " ".join(["python -m tuning_fork", *map(shlex.quote, overrides),
                     shlex.quote(f"hydra.run.dir={run_dir}"), "resume=true"])
