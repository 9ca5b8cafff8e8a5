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


class Hook:
    """What the training loop tells the world (the shape of mlx-lm's TrainingCallback). Every rank builds its
    own hooks once; `run.rank` says which rank this is. `train(cfg, hooks=[...])` adds a caller's own.

    on_train_report: {iteration, train_loss, learning_rate, tokens_per_second, trained_tokens, peak_memory}
    on_validation:   {iteration, val_loss, val_time, and val_<metric> for each task metric}
    on_save:         the iteration just checkpointed
    on_end:          the run's results (results.json), once the final model is scored
    close:           always, last (also after an error)
    """

    def on_train_report(self, run, info: dict) -> None: ...

    def on_validation(self, run, info: dict) -> None: ...

    def on_save(self, run, iteration: int) -> None: ...

    def on_end(self, run, result: dict) -> None: ...

    def close(self) -> None: ...


class MetricsFile(Hook):
    """Appends one JSON object per report to metrics.jsonl (rank 0) and keeps the validation history that
    results.json and a sweep read.

    Iterations count completed optimizer steps for training and validation alike: a validation at
    iteration k measured the model after k steps."""

    def __init__(self, run_dir: Path, write: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.write = write  # False on data-parallel ranks other than 0: they keep the numbers, rank 0 writes
        self.validations: list[dict] = []
        self.last_train: dict = {}

    def log(self, record: dict) -> None:
        if self.write:  # one write() of one line, flushed: a crash loses at most the line being written
            with open(self.path, "a") as fh:
                fh.write(json.dumps(plain(record)) + "\n")
                fh.flush()

    def on_train_report(self, run, info: dict) -> None:
        self.last_train = dict(info)
        self.log(info)

    def on_validation(self, run, info: dict) -> None:
        self.validations.append(dict(info))
        self.log(info)

    def on_end(self, run, result: dict) -> None:
        for record in final_records(result):
            self.log(record)

    def resume(self, upto: int) -> None:
        """Continue a run from step `upto`: keep the reports up to it (rewritten atomically) and drop the
        rest, which the resumed run reports again; so the file stays one continuous record."""
        kept = [rec for rec in read_metrics(self.path.parent) if rec.get("iteration", 0) <= upto
                and not is_final(rec)] if self.path.exists() else []
        if self.write:
            tmp = self.path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self.validations = [rec for rec in kept if "val_loss" in rec]
        self.last_train = next((rec for rec in reversed(kept) if "train_loss" in rec), {})

    def summary(self) -> dict:
        """first, last and best validation loss, the last value of every other validation metric and its
        best, and the last training loss."""
        from .evaluation import direction  # (evaluation imports this module's Hook)

        out = {}
        if self.validations:
            first, last = self.validations[0], self.validations[-1]
            out["first_val_loss"] = first["val_loss"]
            for key in last:
                if key.startswith("val_") and key != "val_time":
                    out[key] = last[key]
                    values = [v[key] for v in self.validations if key in v and math.isfinite(v[key])]
                    better = max if direction(key) == "max" else min
                    out[f"best_{key}"] = better(values) if values else float("nan")
        if "train_loss" in self.last_train:
            out["train_loss"] = self.last_train["train_loss"]
        return out


FINAL_KEYS = {"test_loss", "val_loss_full", "stopped_early"}


def final_records(result: dict) -> list[dict]:
    """The lines a finished run adds to metrics.jsonl after its last validation."""
    at = result.get("iteration")
    out = []
    if result.get("stopped_early"):
        out.append({"iteration": at, "stopped_early": True, "reason": result.get("stop_reason")})
    if "val_loss_full" in result and sampled(result):
        out.append({"iteration": at, "val_loss_full": result["val_loss_full"]})
    if "test_loss" in result:
        out.append({"iteration": at, "test_loss": result["test_loss"],
                    **({"test_ppl": result["test_ppl"]} if "test_ppl" in result else {})})
    if evals := {k: v for k, v in result.items() if k.startswith("eval/")}:  # benchmark tasks (harness.py)
        out.append({"iteration": at, **evals})
    return out


def is_final(record: dict) -> bool:
    return bool(set(record) & FINAL_KEYS) or any(k.startswith("eval/") for k in record)


def sampled(result: dict) -> bool:
    """Did the validations score only a sample of the split (so the whole split was scored at the end)?"""
    return result.get("validated_records", 0) < result.get("valid_records", 0)


def plain(record: dict) -> dict:
    return {k: (float(v) if hasattr(v, "item") else v) for k, v in record.items()}


class WandbLog(Hook):
    """The same reports in a W&B run (rank 0)."""

    def __init__(self, wandb_run):
        self.run = wandb_run

    def _log(self, info: dict) -> None:
        self.run.log({k: v for k, v in plain(info).items() if k != "iteration"}, step=info.get("iteration"))

    def on_train_report(self, run, info: dict) -> None:
        self._log(info)

    def on_validation(self, run, info: dict) -> None:
        self._log(info)

    def on_end(self, run, result: dict) -> None:
        for record in final_records(result):
            self._log(record)

    def close(self) -> None:
        self.run.finish()


class Terminal(Hook):
    """The progress display's report lines (mlx-lm's TrainUI), with task metrics and the run's end."""

    def on_train_report(self, run, info: dict) -> None:
        run.ui.report_train(info["iteration"], info["train_loss"], info["tokens_per_second"], info["trained_tokens"])

    def on_validation(self, run, info: dict) -> None:
        run.ui.report_val(info["iteration"], info["val_loss"], info["val_time"])
        if run.rank != 0:
            return
        extra = {k[4:]: v for k, v in info.items() if k.startswith("val_") and k not in ("val_loss", "val_time")}
        if extra:
            report_line(info["iteration"], "metrics", None, "  ".join(f"{k} {v:.3f}" for k, v in extra.items()))
        if run.state.best.iteration == info["iteration"] and info["iteration"] > 0 and run.best_folder:
            report_line(info["iteration"], "best", None, f"{run.state.best.metric} {run.state.best.value:.4f}")

    def on_end(self, run, result: dict) -> None:
        if run.rank != 0:
            return
        at = result.get("iteration")
        if result.get("stopped_early"):
            report_line(at, "stop", None, result["stop_reason"])
        if "val_loss_full" in result and sampled(result):
            report_line(at, "val", result["val_loss_full"], f"all {result['valid_records']} validation records "
                        f"(the validations above scored {result['validated_records']})")
        if "test_loss" in result:
            report_line(at, "test", result["test_loss"], f"ppl {result['test_ppl']:.2f}" if "test_ppl" in result else "")


def report_line(it, what: str, loss: float | None, extra: str = "") -> None:
    from mlx_lm.cli_ui import make_console

    value = f"[ui.strong]{loss:>5.3f}[/ui.strong]    " if loss is not None else ""
    make_console().print(f"  [ui.muted]{it:>4}[/ui.muted]    [ui.accent]{what}[/ui.accent] {value}"
                         f"[ui.muted]{extra}[/ui.muted]")


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
    if mode is None and wandb_offline():
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


def wandb_offline() -> bool:
    """No W&B server to talk to: WANDB_MODE offline or disabled, or no API key (environment or ~/.netrc)."""
    return os.environ.get("WANDB_MODE") in ("offline", "disabled") or not (
        os.environ.get("WANDB_API_KEY") or _has_netrc_key())


def _has_netrc_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
