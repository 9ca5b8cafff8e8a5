"""The job's side of an Optuna sweep: report validation losses to the trial, stop when the pruner says so.

The sweeper passes the trial's identity and storage as overrides (`optuna.storage`, `optuna.study`,
`optuna.trial_id`, `optuna.pruner`), so this works with every launcher: in-process, joblib processes,
submitit jobs on other machines (with a shared database).
"""

from __future__ import annotations

import math

from .errors import TuningForkError
from .tracking import Hook


class Pruned(TuningForkError):
    """The pruner stopped this trial."""


def make_pruner(name: str, args: dict | None):
    import optuna

    args = dict(args or {})
    pruners = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
               "percentile": optuna.pruners.PercentilePruner, "none": optuna.pruners.NopPruner}
    if name not in pruners:
        raise TuningForkError(f"pruner={name}: choose one of {', '.join(pruners)}")
    if name == "none":
        return optuna.pruners.NopPruner()
    try:
        return pruners[name](**args)
    except TypeError as e:
        raise TuningForkError(f"hydra.sweeper.pruner_args={args}: wrong for the {name} pruner ({e})") from None


class TrialReporter:
    def __init__(self, opt, run_dir):
        import optuna

        study = optuna.load_study(study_name=opt.study, storage=opt.storage,
                                  pruner=make_pruner(opt.pruner, opt.pruner_args))
        self.study, self.trial = study, optuna.trial.Trial(study, opt.trial_id)
        self.trial.set_user_attr("run_dir", str(run_dir))

    def report(self, iteration: int, value: float) -> bool:
        """Report one validation's value; True when the pruner says to stop."""
        if value is None or not math.isfinite(value):
            return False
        self.trial.report(value, iteration)
        return iteration > 0 and self.trial.should_prune()

    def mark_pruned(self) -> None:
        import optuna

        self.study.tell(self.trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)


def per_validation(metric: str) -> str:
    """The value a validation reports for the optimized metric: val_loss for best_val_loss, val_x for
    best_val_x; the validation loss for metrics known only at the end (train_loss, test_loss)."""
    name = metric.removeprefix("best_")
    return name if name.startswith("val_") and name != "val_loss_full" else "val_loss"


class TrialHook(Hook):
    """Reports each validation to the job's Optuna trial (rank 0) and stops every rank when the pruner
    says so: rank 0 decides, all ranks learn it through one all_sum."""

    def __init__(self, cfg, run_dir, rank: int):
        self.reporter = TrialReporter(cfg.optuna, run_dir) if rank == 0 else None
        self.metric = per_validation(cfg.optimized_metric)
        self.reported: set[int] = set()

    def on_validation(self, run, info: dict) -> None:
        from .distributed import all_sum

        if info["iteration"] >= run.plan["iters"]:
            return  # the final model's value goes in once the run ends (on_end)
        prune = self.reporter is not None and self.reporter.report(info["iteration"], info.get(self.metric))
        self.reported.add(info["iteration"])
        if all_sum(run.group, int(prune)) > 0:
            raise Pruned(f"pruned at iteration {info['iteration']} ({self.metric} {info.get(self.metric):.4f})")

    def on_end(self, run, result: dict) -> None:
        value = result.get(self.metric)
        if self.reporter is not None and result["iteration"] not in self.reported and value is not None \
                and math.isfinite(value):
            self.reporter.trial.report(value, result["iteration"])

    def mark_pruned(self) -> None:
        if self.reporter is not None:
            self.reporter.mark_pruned()
