"""Where a run's numbers go: metrics.jsonl in the run folder, the terminal, and W&B when configured."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

SECRET_WORDS = ("key", "token", "secret", "password")


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's reports, one per line of metrics.jsonl; a line a crash cut short is skipped."""
    rows = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class Metrics:
    """Appends one JSON object per report to metrics.jsonl and keeps what a sweep needs to optimize.

    Iterations count completed optimizer steps for training and validation alike: a validation at
    iteration k measured the model after k steps."""

    def __init__(self, run_dir: Path, wandb_run=None, write: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.wandb = wandb_run
        self.write = write  # False on data-parallel ranks other than 0: they keep the numbers, rank 0 writes
        self.val_losses: list[tuple[int, float]] = []
        self.last_train: dict = {}

    def log(self, record: dict) -> None:
        record = {k: (float(v) if hasattr(v, "item") else v) for k, v in record.items()}
        if self.write:  # one write() of one line, flushed: a crash loses at most the line being written
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
        if self.wandb is not None:
            step = record.get("iteration")
            self.wandb.log({k: v for k, v in record.items() if k != "iteration"}, step=step)

    def train_report(self, info: dict) -> None:
        keep = ("iteration", "train_loss", "learning_rate", "tokens_per_second", "trained_tokens", "peak_memory")
        self.last_train = {k: info[k] for k in keep if k in info}
        self.log(dict(self.last_train))

    def val_report(self, iteration: int, val_loss: float, val_time: float | None = None) -> None:
        self.val_losses.append((iteration, val_loss))
        rec = {"iteration": iteration, "val_loss": val_loss}
        if val_time is not None:
            rec["val_time"] = val_time
        self.log(rec)

    def resume(self, upto: int) -> None:
        """Continue a run from step `upto`: keep the reports up to it (rewritten atomically) and drop the
        rest, which the resumed run reports again; so the file stays one continuous record."""
        kept = [rec for rec in read_metrics(self.path.parent)
                if rec.get("iteration", 0) <= upto and "test_loss" not in rec] if self.path.exists() else []
        if self.write:
            tmp = self.path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        for rec in kept:
            if "val_loss" in rec:
                self.val_losses.append((rec["iteration"], rec["val_loss"]))
            if "train_loss" in rec:
                self.last_train = rec

    def summary(self) -> dict:
        out = {}
        if self.val_losses:
            finite = [v for _, v in self.val_losses if math.isfinite(v)]
            out["first_val_loss"] = self.val_losses[0][1]
            out["val_loss"] = self.val_losses[-1][1]
            out["best_val_loss"] = min(finite) if finite else float("nan")
        if "train_loss" in self.last_train:
            out["train_loss"] = self.last_train["train_loss"]
        return out


def scrub(obj):
    """A copy of a config dict without anything that looks like a credential."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if any(w in str(k).lower() for w in SECRET_WORDS) and isinstance(v, str)
                    else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def scrub_hydra_files(run_dir: Path) -> None:
    """Hydra saves the composed config and the command line in <run>/.hydra/ before the run starts: take
    anything that looks like a credential out of them too."""
    from omegaconf import OmegaConf

    def override(text):
        key, sep, value = str(text).partition("=")
        return f"{key}=<redacted>" if sep and any(w in key.lower() for w in SECRET_WORDS) else text

    def clean(obj):
        if isinstance(obj, list):
            return [override(v) if isinstance(v, str) else clean(v) for v in obj]
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in scrub(obj).items()}
        return obj

    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        path = run_dir / ".hydra" / name
        if not path.exists() or not any(w in path.read_text().lower() for w in SECRET_WORDS):
            continue
        try:
            data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except Exception:  # not ours to judge: leave a file we cannot read as it is
            continue
        tmp = path.with_name(f".{name}.tmp")
        OmegaConf.save(OmegaConf.create(clean(data)), tmp)
        os.replace(tmp, path)


def start_wandb(cfg, run_dir: Path, config_dict: dict, resume_id: str | None = None):
    """A W&B run writing its files inside the run folder, or None when wandb.project is null.

    WANDB_MODE=offline (or no API key) logs locally for `wandb sync` later."""
    if not cfg.wandb.project:
        return None
    import wandb

    mode = os.environ.get("WANDB_MODE")
    if mode is None and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
        mode = "offline"
    if cfg.wandb.sweep_id and not cfg.wandb.sweep_id.startswith("local-") and mode != "offline":
        os.environ["WANDB_SWEEP_ID"] = cfg.wandb.sweep_id  # attach the run to the server's sweep
    return wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        name=cfg.wandb.run or run_dir.name,
        group=cfg.wandb.group,
        tags=list(cfg.wandb.tags) or None,
        dir=str(run_dir),
        config=scrub(config_dict),
        mode=mode,
        reinit="finish_previous",
        **({"id": resume_id, "resume": "allow"} if resume_id else {}),
    )


def _has_netrc_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
