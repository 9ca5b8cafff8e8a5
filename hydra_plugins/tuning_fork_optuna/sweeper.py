"""`hydra/sweeper=tuning_fork_optuna`: an Optuna sweep over tuning_fork's train entrypoint.

What hydra-optuna-sweeper does not: every job reports its validation losses to its own trial and is
pruned (PRUNED) when the pruner says so — the trial's identity and the storage travel to the job as
overrides, so every launcher works; a job that fails or returns NaN is recorded as FAIL and the sweep
goes on; the study lives in SQLite inside the sweep folder by default (any database URL works), so a rerun
continues it and several sweep processes can share it; the end of a sweep prints a table and writes
trials.csv, val_loss.png and optimization_results.yaml. Search spaces use hydra-optuna-sweeper's syntax:
`interval(1e-5, 1e-3)`, `tag(log, interval(...))`, `choice(4, 8)`, `range(1, 4)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from hydra_plugins.tuning_fork_sweep.engine import Engine, bad, check_metric, open_study

log = logging.getLogger(__name__)


@dataclass
class TuningForkOptunaConf:
    _target_: str = "hydra_plugins.tuning_fork_optuna.sweeper.TuningForkOptunaSweeper"
    sampler: str = "tpe"  # tpe | random | grid | qmc
    seed: Optional[int] = None
    direction: str = "minimize"
    study_name: str = "tuning_fork"
    storage: Optional[str] = None  # null: sqlite:///<sweep dir>/optuna.db
    n_trials: int = 10  # trials this sweep process runs (a rerun adds as many to the same study)
    n_jobs: int = 1  # trials handed to the launcher at once (parallel with joblib, submitit, ...)
    pruner: str = "median"  # median | hyperband | percentile | none
    pruner_args: Any = None  # the pruner's own arguments, e.g. {n_startup_trials: 2} (replaced whole)
    params: Dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="tuning_fork_optuna", node=TuningForkOptunaConf,
                             provider="tuning_fork")


class TuningForkOptunaSweeper(Engine):
    def __init__(self, sampler, seed, direction, study_name, storage, n_trials, n_jobs, pruner, pruner_args,
                 params):
        self.sampler_name, self.seed, self.direction = sampler, seed, direction
        self.study_name, self.storage, self.n_trials, self.n_jobs = study_name, storage, n_trials, n_jobs
        self.pruner = pruner
        self.pruner_args = dict(OmegaConf.to_container(pruner_args) if OmegaConf.is_config(pruner_args)
                                else pruner_args or {})
        self.params = dict(OmegaConf.to_container(params) if OmegaConf.is_config(params) else params or {})

    def sweep(self, arguments: List[str]) -> None:
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
        from tuning_fork.errors import TuningForkError
        from hydra_plugins.tuning_fork_sweep.report import report
        from tuning_fork.trial import make_pruner

        check_metric(self.config, self.config.optimized_metric)
        sweep_dir = Path(self.config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = self.storage or f"sqlite:///{sweep_dir / 'optuna.db'}"
        space = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        distributions, fixed, fixed_overrides = create_params_from_overrides(space)
        for name in fixed:
            distributions.pop(name, None)
        try:
            pruner = make_pruner(self.pruner, self.pruner_args)
        except TuningForkError as e:
            bad(str(e))
        study = open_study(self.study_name, storage, self._sampler(distributions), self.direction, pruner)
        log.info(f"Optuna study {study.study_name} in {storage}: {len(study.trials)} trials so far")
        self.run_trials(study, storage, distributions, fixed, list(fixed_overrides), self.n_trials)
        report(study, sweep_dir, self.direction)
