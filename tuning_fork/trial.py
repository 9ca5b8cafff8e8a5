"""The job's side of an Optuna sweep: report validation losses to the trial, stop when the pruner says so.

The sweeper passes the trial's identity and storage as overrides (`optuna.storage`, `optuna.study`,
`optuna.trial_id`, `optuna.pruner`), so this works with every launcher: in-process, joblib processes,
submitit jobs on other machines (with a shared database).
"""

from __future__ import annotations

import math

from .errors import TuningForkError


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

    def report(self, iteration: int, val_loss: float) -> None:
        if not math.isfinite(val_loss):
            return
        self.trial.report(val_loss, iteration)
        if iteration > 0 and self.trial.should_prune():
            raise Pruned(f"pruned at iteration {iteration} (validation loss {val_loss:.4f})")

    def mark_pruned(self) -> None:
        import optuna

        self.study.tell(self.trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
