"""`hydra/sweeper=tuning_fork_wandb`: a W&B sweep configuration, run as Hydra jobs.

The sweep configuration is the YAML W&B users write (method grid/random/bayes, metric and goal, parameters
with W&B's distributions, early_terminate: hyperband, run_cap), inline under `hydra.sweeper.sweep` or from a
file (`hydra.sweeper.sweep_config=my_sweep.yaml`). Each suggested parameter set is a Hydra job through the
configured launcher, logged as its own W&B run in the sweep's group.

The engine is Optuna, not W&B's server or its local controller (PyPI `sweeps`, which pins numpy<2):
grid -> GridSampler, random -> RandomSampler, bayes -> TPESampler, early_terminate hyperband -> Optuna's
HyperbandPruner fed by every job's validation losses. So a sweep runs end to end with no network
(WANDB_MODE=offline, or no API key), its runs logged offline for `wandb sync`. With W&B reachable the sweep
is also registered on the server (`wandb.sweep`) and every run is attached to it (WANDB_SWEEP_ID), so it
shows in W&B's sweep views; the suggestions still come from the local engine.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from hydra_plugins.tuning_fork_sweep.engine import Engine, bad, check_metric, open_study, quote

log = logging.getLogger(__name__)


@dataclass
class TuningForkWandbConf:
    _target_: str = "hydra_plugins.tuning_fork_wandb.sweeper.TuningForkWandbSweeper"
    sweep_config: Optional[str] = None  # a W&B sweep YAML file; wins over `sweep`
    sweep: Dict[str, Any] = field(default_factory=dict)  # or the W&B sweep configuration inline
    project: Optional[str] = None  # null: wandb.project of the run config, else "tuning_fork"
    entity: Optional[str] = None
    count: Optional[int] = None  # runs to launch; null: run_cap, else the grid's size, else 10
    n_jobs: int = 1
    seed: Optional[int] = None


ConfigStore.instance().store(group="hydra/sweeper", name="tuning_fork_wandb", node=TuningForkWandbConf,
                             provider="tuning_fork")


def flatten(parameters: dict, prefix: str = "") -> dict:
    """W&B's nested `parameters: {a: {parameters: {b: {...}}}}` as dotted keys."""
    out = {}
    for name, spec in parameters.items():
        if isinstance(spec, dict) and "parameters" in spec:
            out.update(flatten(spec["parameters"], f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = spec
    return out


def distribution(name: str, spec: dict):
    """A W&B parameter as an Optuna distribution (or ('fixed', value))."""
    import optuna.distributions as d

    if not isinstance(spec, dict):
        bad(f"sweep parameter {name}: want a mapping such as {{values: [...]}}, got {spec!r}")
    if "value" in spec:
        return ("fixed", spec["value"])
    if "values" in spec:
        return d.CategoricalDistribution(list(spec["values"]))
    kind = spec.get("distribution")
    lo, hi = spec.get("min"), spec.get("max")
    if kind is None and lo is not None:
        kind = "int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform"
    if kind == "constant":
        return ("fixed", spec["value"])
    if kind == "categorical":
        return d.CategoricalDistribution(list(spec["values"]))
    if kind == "int_uniform":
        return d.IntDistribution(int(lo), int(hi))
    if kind == "uniform":
        return d.FloatDistribution(float(lo), float(hi))
    if kind == "q_uniform":
        return d.FloatDistribution(float(lo), float(hi), step=float(spec.get("q", 1.0)))
    if kind == "log_uniform_values":
        return d.FloatDistribution(float(lo), float(hi), log=True)
    if kind == "log_uniform":  # W&B: min and max are exponents of e
        return d.FloatDistribution(math.exp(float(lo)), math.exp(float(hi)), log=True)
    bad(f"sweep parameter {name}: distribution {kind!r} is not supported by the local engine "
                     "(use values, uniform, int_uniform, q_uniform, log_uniform or log_uniform_values)")


class TuningForkWandbSweeper(Engine):
    def __init__(self, sweep_config, sweep, project, entity, count, n_jobs, seed):
        spec = OmegaConf.to_container(sweep) if sweep else {}
        if sweep_config:
            path = Path(sweep_config).expanduser()
            try:
                spec = yaml.safe_load(path.read_text()) or {}
            except OSError as e:
                bad(f"hydra.sweeper.sweep_config={sweep_config}: cannot read it ({e.strerror})")
        if not spec.get("parameters"):
            bad("the W&B sweep configuration has no parameters: set hydra.sweeper.sweep "
                             "or hydra.sweeper.sweep_config")
        self.spec, self.project, self.entity, self.count = spec, project, entity, count
        method = spec.get("method", "random")
        if method not in ("grid", "random", "bayes"):
            bad(f"sweep method {method!r}: choose grid, random or bayes")
        metric = spec.get("metric", {}) or {}
        et = spec.get("early_terminate") or {}
        pruner, pruner_args = "none", {}
        if et:
            if et.get("type") != "hyperband":
                bad(f"early_terminate type {et.get('type')!r}: only hyperband is supported")
            pruner = "hyperband"
            pruner_args = {"min_resource": int(et.get("min_iter", 1)), "reduction_factor": int(et.get("eta", 3))}
            if "max_iter" in et:
                pruner_args["max_resource"] = int(et["max_iter"])
        self.sampler_name = {"grid": "grid", "random": "random", "bayes": "tpe"}[method]
        self.direction = "maximize" if metric.get("goal") == "maximize" else "minimize"
        self.seed, self.n_jobs, self.pruner, self.pruner_args = seed, n_jobs, pruner, pruner_args
        self.metric = metric.get("name", "best_val_loss")

    def sweep(self, arguments):
        from tuning_fork.errors import TuningForkError
        from hydra_plugins.tuning_fork_sweep.report import report
        from tuning_fork.trial import make_pruner

        check_metric(self.config, self.metric)  # before the study, the folder or a server sweep exist
        sweep_dir = Path(self.config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        distributions, fixed = {}, {}
        for name, spec in flatten(self.spec["parameters"]).items():
            dist = distribution(name, spec)
            if isinstance(dist, tuple):
                fixed[name] = dist[1]
            else:
                distributions[name] = dist
        n = self.count or self.spec.get("run_cap") or 10
        if self.sampler_name == "grid":
            from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

            grid = math.prod(len(OptunaSweeperImpl._to_grid_sampler_choices(d)) for d in distributions.values())
            n = min(self.count or self.spec.get("run_cap") or grid, grid)
        storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
        try:
            pruner = make_pruner(self.pruner, self.pruner_args)
        except TuningForkError as e:
            bad(str(e))
        study = open_study("wandb_sweep", storage, self._sampler(distributions), self.direction, pruner)
        project = self.project or self.config.get("wandb", {}).get("project") or "tuning_fork"
        sweep_id = self._register(project) or f"local-{sweep_dir.name}"
        extra = [f"wandb.project={quote(project)}", f"wandb.group={quote(sweep_id)}",
                 f"wandb.sweep_id={quote(sweep_id)}", f"optimized_metric={self.metric}"]
        if self.entity:
            extra.append(f"wandb.entity={quote(self.entity)}")
        fixed_overrides = [f"{k}={v}" for k, v in fixed.items()] + list(arguments)
        log.info(f"W&B sweep {sweep_id} ({self.spec.get('method', 'random')}, {n} runs) in project {project}")
        self.run_trials(study, storage, distributions, {}, fixed_overrides + extra, n)
        report(study, sweep_dir, self.direction, title=f"W&B sweep {sweep_id}")

    def _register(self, project: str) -> Optional[str]:
        """The sweep on W&B's server when it is reachable; None offline."""
        from tuning_fork.tracking import wandb_offline

        if wandb_offline():
            return None
        try:
            import wandb

            return wandb.sweep(self.spec, project=project, entity=self.entity)
        except Exception as e:  # no server after all: run locally
            log.warning(f"W&B sweep not registered on the server ({type(e).__name__}): running it locally")
            return None
