"""The engine both sweepers run on: an Optuna study, trials asked, launched as Hydra jobs through the
configured launcher and told; the trial's identity and storage travel to each job as overrides, so the job
reports its validations to its own trial (tuning_fork/trial.py) and is pruned there."""

from __future__ import annotations

import logging
import math
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper

log = logging.getLogger(__name__)


def bad(message: str):
    """A sweep configuration error: one line and exit 2, not a traceback through Hydra's instantiate."""
    import sys

    print(f"tuning_fork: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_metric(config, metric: str) -> None:
    """The metric a sweep optimizes must be one a run returns: refused before any study or trial exists."""
    from tuning_fork.config import check_optimized_metric
    from tuning_fork.errors import ConfigError

    try:
        check_optimized_metric(config, has_test=True, metric=metric)
    except ConfigError as e:
        bad(str(e))


def open_study(name, storage, sampler, direction, pruner):
    """Create or load the study. Sweep processes starting together on a new database race to create its
    tables; the loser retries and loads what the winner made."""
    import random
    import time

    import optuna

    for attempt in range(6):
        try:
            return optuna.create_study(study_name=name, storage=storage, load_if_exists=True, sampler=sampler,
                                       direction=direction, pruner=pruner)
        except Exception as e:  # sqlalchemy's IntegrityError / OperationalError ("database is locked")
            if attempt == 5 or type(e).__module__.split(".")[0] not in ("sqlalchemy", "optuna"):
                raise
            time.sleep(0.2 + random.random())


def quote(value: Any) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


class Engine(Sweeper):
    """A sweeper's shared part. A subclass sets sampler_name, seed, direction, n_jobs, pruner, pruner_args
    and calls run_trials from its sweep()."""

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def _sampler(self, distributions):
        import optuna

        if self.sampler_name == "grid":
            from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

            space = {k: OptunaSweeperImpl._to_grid_sampler_choices(d) for k, d in distributions.items()}
            return optuna.samplers.GridSampler(space, seed=self.seed)
        samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                    "qmc": optuna.samplers.QMCSampler}
        if self.sampler_name not in samplers:
            bad(f"hydra.sweeper.sampler={self.sampler_name}: choose tpe, random, grid or qmc")
        return samplers[self.sampler_name](seed=self.seed)

    def run_trials(self, study, storage, distributions, fixed: dict, fixed_overrides: list, n_trials: int) -> None:
        """Ask, launch (n_jobs at a time through the launcher), tell; the jobs report to their trials."""
        identity = [f"optuna.storage={quote(storage)}", f"optuna.study={quote(study.study_name)}",
                    f"optuna.pruner={self.pruner}",
                    f"optuna.pruner_args={{{','.join(f'{k}:{v}' for k, v in self.pruner_args.items())}}}"]
        job_idx, to_go = 0, n_trials
        while to_go > 0:
            trials = [study.ask(distributions) for _ in range(min(self.n_jobs, to_go))]
            batch = []
            for trial in trials:
                for k, v in fixed.items():
                    trial.set_user_attr(k, v)
                params = {**trial.params, **fixed}
                # one folder per trial number: reruns and concurrent sweeps on one study never collide
                batch.append([f"{k}={v}" for k, v in params.items()] + fixed_overrides + identity
                             + [f"optuna.trial_id={trial._trial_id}", f"hydra.sweep.subdir={trial.number}"])
            returns = self.launcher.launch(batch, initial_job_idx=job_idx)
            job_idx += len(returns)
            for trial, ret in zip(trials, returns):
                self._tell(study, trial, ret)
            to_go -= len(trials)

    @staticmethod
    def _tell(study, trial, ret) -> None:
        import optuna

        if study._storage.get_trial(trial._trial_id).state.is_finished():
            return  # the job told it already (pruned)
        try:
            value = float(ret.return_value)  # raises the job's own exception if it failed
        except Exception as e:
            log.warning(f"trial {trial.number} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            _tell(study, trial, state=optuna.trial.TrialState.FAIL)
            return
        if not math.isfinite(value):
            log.warning(f"trial {trial.number} returned {value}: recorded as failed")
            _tell(study, trial, state=optuna.trial.TrialState.FAIL)
            return
        _tell(study, trial, values=value)


def _tell(study, trial, **kwargs) -> None:
    try:
        study.tell(trial, **kwargs)
    except RuntimeError as e:  # the grid sampler calls study.stop() when its grid is done; the tell stands
        if "Study.stop" not in str(e):
            raise
