"""The one training entrypoint: `train(cfg, hooks=()) -> results`, called by the CLI, pipelines, sweeps and tests.

Reads top to bottom: `setup` checks the config and the data, tokenizes through the objective, loads the
model, attaches adapters (or restores a checkpoint) and builds the hooks; `loop` runs one compiled step at
a time (tuning_fork/step.py) with reports, validations and checkpoints on the plan's intervals; `finish`
scores the final model (the whole validation split, the test split) and writes results.json.

What a batch holds and its loss belong to the objective (tuning_fork/objectives/); what the loop tells the
world goes through hooks (metrics.jsonl, W&B, the terminal, a sweep's trial, the best adapter, early
stopping: tracking.Hook). Every rank of a data-parallel run runs this; rank 0 alone writes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from . import config as config_schema
from . import data, distributed, models, objectives, schedule, tracking
from .checkpoint import Checkpoints, Interrupted, StopSignals, TrainState, Window, check_same_config, find_resume
from .errors import ConfigError, DataError, TuningForkError
from .evaluation import Best, EarlyStopping, Validator, direction
from .step import HostPace, build_optimizer, direct_cuda_launches, make_step
from .trial import Pruned


@dataclass
class Run:
    """Everything a training run holds; hooks receive it."""

    cfg: object
    group: object
    run_dir: Path
    checkpoints: Checkpoints
    objective: object
    sets: dict  # split name -> the objective's records
    plan: dict
    base: str
    model: object = None
    optimizer: object = None
    step: object = None
    grad: object = None  # gradients accumulated since the last optimizer update
    arrays: list = field(default_factory=list)  # what to evaluate after each step
    state: TrainState = field(default_factory=TrainState)
    validator: Validator | None = None
    metrics: tracking.MetricsFile | None = None
    hooks: list = field(default_factory=list)
    ui: object = None
    direct: bool = False  # CUDA kernels launch directly (HostPace)
    stop_reason: str | None = None  # set by a hook (early stopping): the run ends, normally, at the next update
    best_folder: Path | None = None
    tokenizer: object = None

    @property
    def rank(self) -> int:
        return self.group.rank()

    def emit(self, event: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)


def train(cfg, hooks=()) -> dict:
    run = setup(cfg, list(hooks))
    try:
        loop(run)
        return finish(run)
    except Pruned as stopped:  # the sweep's pruner gave up on this trial: keep what it learned, say so
        return pruned(run, stopped)
    finally:
        for hook in run.hooks:
            hook.close()


# ------------------------------------------------------------------------------------------------ setup


def setup(cfg, extra_hooks: list) -> Run:
    config_schema.check(cfg)
    direct = direct_cuda_launches()  # before any kernel runs
    group = distributed.world()  # one process, or one of the ranks mlx.launch started
    distributed.check_batch(cfg.schedule.batch_size, group.size())
    run_dir = Path(distributed.share_text(group, str(output_dir(cfg).resolve())))
    checkpoints = Checkpoints(run_dir, cfg.schedule.keep_checkpoints)  # (the app scrubbed Hydra's files)
    resume_from = find_resume(cfg, run_dir, checkpoints)
    distributed.barrier(group)  # every rank has looked at the folder before rank 0 writes to it

    run = prepare_data(cfg, group, run_dir, checkpoints)
    run.direct = direct
    prepare_model(run, resume_from)
    run.hooks = build_hooks(run, resume_from) + extra_hooks
    if run.rank == 0:
        print_header(run)
    return run


def prepare_data(cfg, group, run_dir: Path, checkpoints: Checkpoints) -> Run:
    """Records checked and tokenized (over-long ones handled) before any weights load; the plan."""
    splits = data.load_splits(cfg.data, cfg.prompt)
    config_schema.check_optimized_metric(cfg, "test" in splits)
    if len(splits["train"].records) < cfg.schedule.batch_size:
        raise DataError(f"{splits['train'].origin}: {len(splits['train'].records)} training records, fewer than "
                        f"one batch (schedule.batch_size={cfg.schedule.batch_size}): lower the batch size or add records")
    base = models.resolve(cfg.model.path)
    config_schema.check_recipe(cfg)
    if cfg.init_from:
        base = models.chain_source(cfg)[0]
    models.check_trainable(base, cfg.adapter)
    tokenizer = models.load_tokenizer(base, cfg.model.trust_remote_code)
    objective = objectives.build(cfg, group.rank(), group.size())
    sets = objective.encode(splits, tokenizer)
    plan = schedule.run_plan(cfg, objective.rows(sets["train"]), len(sets["valid"]))
    run = Run(cfg, group, run_dir, checkpoints, objective, sets, plan, base, tokenizer=tokenizer)
    run.validator = Validator(cfg, objective, sets["valid"], splits["valid"], tokenizer, plan["val_batches"],
                              group.rank(), group.size())
    return run


def prepare_model(run: Run, resume_from: Path | None) -> None:
    """The model with its adapters (chained from init_from), the optimizer, the state — all three from
    the last checkpoint when resuming — and the compiled step."""
    import mlx.core as mx
    import numpy as np

    cfg, s = run.cfg, run.cfg.schedule
    previous = None
    if cfg.init_from:
        run.base, source, previous = models.chain_source(cfg, build=run.rank == 0)
        distributed.barrier(run.group)
    run.model, _ = models.load(OmegaConf.merge(cfg.model, {"path": run.base}) if previous else cfg.model)
    mx.random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    adapter_config = {"model": run.base, **models.attach(run.model, cfg.adapter, cfg.model)}
    if previous and previous.get("fine_tune_type") != "full":
        models.check_chain(cfg.init_from, previous, adapter_config)
        models.load_previous(run.model, source)
    if s.lean_layers:  # the same losses and gradients with fewer saved activations
        from .layers import lean

        lean(run.model, cfg.adapter.dropout)
    if hasattr(run.objective, "prepare"):  # e.g. the reference log-probabilities of the starting policy
        run.objective.prepare(run.model, run.sets, run.run_dir, resume_from is not None)
    run.optimizer = build_optimizer(s, math.ceil(run.plan["iters"] / s.grad_accumulation_steps), run.plan["warmup"])
    resolved = resolved_config(cfg, run.plan)
    es = s.early_stopping
    metric = getattr(run.objective, "monitor", es.metric) if es.metric == "val_loss" else es.metric  # grpo: reward
    run.state = TrainState(config=resolved, best=Best(metric, direction(metric, es.mode)))
    if resume_from is not None:
        run.state = run.checkpoints.restore(resume_from, run.model, run.optimizer)
        check_same_config(run.state.config, resolved, resume_from)
    if run.rank == 0:
        run.run_dir.joinpath("adapters").mkdir(parents=True, exist_ok=True)
        models.write_json(run.run_dir / "adapters" / "adapter_config.json", adapter_config)
        write_config(resolved, run.run_dir)
    run.step, run.arrays = make_step(run.model, run.optimizer, s.grad_accumulation_steps, s.grad_checkpoint,
                                     loss_fn=run.objective.loss, bucket_mb=s.reduce_bucket_mb,
                                     checkpoint_part=s.checkpoint_part, checkpoint_layers=s.checkpoint_layers)


def build_hooks(run: Run, resume_from: Path | None) -> list:
    """metrics.jsonl, the terminal, W&B, the best adapter, early stopping and a sweep's trial: once per rank."""
    from mlx_lm.cli_ui import TrainUI

    cfg = run.cfg
    run.metrics = tracking.MetricsFile(run.run_dir, write=run.rank == 0)
    if resume_from is not None:
        run.metrics.resume(run.state.step)
    hooks = [run.metrics, tracking.Terminal(), BestAdapter()]
    hooks += run.objective.hooks(run) if hasattr(run.objective, "hooks") else []  # e.g. grpo's sample completions
    if run.rank == 0 and cfg.wandb.project:
        wandb_run = tracking.start_wandb(cfg, run.run_dir, run.state.config, run.state.wandb_id)
        run.state.wandb_id = wandb_run.id
        hooks.append(tracking.WandbLog(wandb_run))
    if cfg.schedule.early_stopping.patience:
        hooks.append(EarlyStopping(cfg.schedule.early_stopping))
    if cfg.optuna.trial_id is not None:  # a job of an Optuna sweep: report to its trial
        from .trial import TrialHook

        hooks.append(TrialHook(cfg, run.run_dir, run.rank))
    run.ui = TrainUI(run.plan["iters"], rank=run.rank)
    return hooks


class BestAdapter(tracking.Hook):
    """Each validation that improves the monitored metric writes adapters/best/ (rank 0)."""

    def on_validation(self, run: Run, info: dict) -> None:
        if run.state.best.iteration == info["iteration"] and run.rank == 0:
            run.best_folder = run.checkpoints.save_best(run.model)


# ------------------------------------------------------------------------------------------------- loop


def loop(run: Run) -> None:
    """One step at a time, from the state's step to the plan's last iteration (or an early stop); reports,
    validations and checkpoints on the plan's intervals."""
    import mlx.core as mx

    p, state = run.plan, run.state
    mx.reset_peak_memory()
    run.model.train()
    pace = HostPace(run.direct)
    try:
        with run.ui, StopSignals() as stop:
            for _ in range(state.step):
                run.ui.advance()
            if state.step == 0:
                validate(run, 0)
            batches = run.objective.train_batches(run.sets["train"], state.step)
            for done in range(state.step + 1, p["iters"] + 1):
                boundary = train_step(run, done, next(batches), pace)
                stopping = boundary and distributed.all_sum(run.group, int(stop.signal is not None)) > 0
                ending = boundary and run.stop_reason is not None
                if done % p["steps_per_report"] == 0 or done == p["iters"] or (ending and state.window.steps):
                    report(run, done)
                if done % p["steps_per_eval"] == 0 or done == p["iters"]:
                    validate(run, done)
                    ending = boundary and run.stop_reason is not None
                if boundary and (done % p["save_every"] == 0 or done == p["iters"] or stopping or ending):
                    state.stopped_early = ending
                    save(run, done)
                if stopping:
                    raise Interrupted(stop.signal, done, p["iters"], run.run_dir)
                if ending:
                    break
    finally:
        pace.close()


def train_step(run: Run, done: int, batch, pace: HostPace) -> bool:
    """One compiled step; returns whether it applied the optimizer (a gradient-accumulation boundary)."""
    import mlx.core as mx

    tic = time.perf_counter()
    s, w = run.cfg.schedule, run.state.window
    mx.random.seed(run.cfg.seed * 1_000_003 + done)  # dropout's draws depend on the step alone
    boundary = done % s.grad_accumulation_steps == 0 or done == run.plan["iters"]
    pace.before(batch[0].size)
    value, _, aux, run.grad = run.step(batch, run.grad, boundary)
    mx.eval(run.arrays, value, aux, run.grad)
    pace.stepped(boundary)
    w.loss += value.item()
    w.tokens += int(aux["tokens"].item())
    for k, v in aux.items():
        if k != "tokens":
            w.metrics[k] = w.metrics.get(k, 0.0) + v.item()
    w.steps += 1
    w.seconds += time.perf_counter() - tic
    run.state.step = done
    if run.group.size() == 1 and not math.isfinite(w.loss):
        raise TuningForkError(diverged(w.loss, done, run.checkpoints))
    run.ui.advance()
    return boundary


def report(run: Run, done: int) -> None:
    import mlx.core as mx

    w, state = run.state.window, run.state
    train_loss = distributed.all_sum(run.group, w.loss) / (w.steps * run.group.size())
    tokens = distributed.all_sum(run.group, w.tokens)
    state.trained_tokens += tokens
    if not math.isfinite(train_loss):
        raise TuningForkError(diverged(train_loss, done, run.checkpoints))
    extra = {f"train_{k}": distributed.all_sum(run.group, v) / (w.steps * run.group.size())
             for k, v in sorted(w.metrics.items())}
    run.emit("on_train_report", {"iteration": done, "train_loss": train_loss, **extra,
                                 "learning_rate": run.optimizer.learning_rate.item(),
                                 "tokens_per_second": tokens / w.seconds, "trained_tokens": state.trained_tokens,
                                 "peak_memory": mx.get_peak_memory() / 1e9})
    state.window = Window()


def validate(run: Run, done: int) -> None:
    info = run.validator(run.model, done, run.ui)
    best = run.state.best
    best.update(done, info.get(best.metric), run.cfg.schedule.early_stopping.min_delta)
    run.emit("on_validation", info)


def save(run: Run, done: int) -> None:
    if not math.isfinite(distributed.all_sum(run.group, run.state.window.loss)):
        raise TuningForkError(diverged(run.state.window.loss, done, run.checkpoints))
    if run.rank == 0:
        run.checkpoints.save(done, run.model, run.optimizer, run.state)
    distributed.barrier(run.group)  # no rank runs ahead of a checkpoint it might need
    run.emit("on_save", done)


# ----------------------------------------------------------------------------------------------- finish


def finish(run: Run) -> dict:
    """The final model's numbers: the last validation (above), the whole validation split when only a
    sample was validated, the test split; then results.json."""
    import mlx.core as mx

    cfg, state = run.cfg, run.state
    result = run.metrics.summary()
    if run.validator.full_at_end:
        result["val_loss_full"] = run.validator.whole_split(run.model)
    elif cfg.schedule.final_validation == "full" and "val_loss" in result:
        result["val_loss_full"] = result["val_loss"]  # the sample was the whole split
    if "test" in run.sets:
        from .evaluation import evaluate, validation_sample

        records, n = run.sets["test"], cfg.schedule.test_batches
        indices = None if n == -1 else validation_sample(run.objective.lengths(records), n * cfg.schedule.batch_size,
                                                        cfg.seed)
        test_loss = evaluate(run.model, run.objective.eval_batches(run.sets["test"], indices),
                             run.objective.eval_loss)
        result.update(test_loss=test_loss)
        if cfg.objective.name == "sft":  # (a perplexity is a next-token loss's)
            result.update(test_ppl=math.exp(min(test_loss, 700)))
    if cfg.eval.tasks:  # benchmark tasks through lm-evaluation-harness, on the final model (harness.py)
        from .harness import run_tasks, scores, write_results

        harness = run_tasks(run.model, run.tokenizer, cfg.eval, cfg.seed)
        if run.rank == 0:
            write_results(harness, run.run_dir / "eval" / "results.json")
        result.update(scores(harness))
    result.update(valid_records=len(run.sets["valid"]), validated_records=run.validator.records_scored,
                  iters=run.plan["iters"], iteration=state.step, best_iteration=state.best.iteration,
                  stopped_early=state.stopped_early, peak_memory=mx.get_peak_memory() / 1e9,
                  run_dir=str(run.run_dir))
    if state.best.metric != "val_loss":
        result[f"best_{state.best.metric}"] = state.best.value
    if run.stop_reason and state.stopped_early:
        result["stop_reason"] = run.stop_reason
    if (run.run_dir / "adapters" / "best" / "adapters.safetensors").exists():
        result["best_adapters"] = str(run.run_dir / "adapters" / "best")
    run.emit("on_end", result)
    if run.rank == 0:
        models.write_json(run.run_dir / "results.json", result)
        print(f"tuning_fork: adapters in {run.run_dir / 'adapters'} (best: adapters/best, iteration "
              f"{state.best.iteration}); next: python -m tuning_fork.generate run={run.run_dir} \"prompt.text=...\" "
              f"· python -m tuning_fork.plot {run.run_dir}")
    return result


def pruned(run: Run, stopped: Pruned) -> dict:
    last = run.metrics.validations[-1]
    result = {**run.metrics.summary(), "pruned": True, "reason": str(stopped), "iteration": last["iteration"],
              "best_iteration": run.state.best.iteration}
    if run.rank == 0:
        for hook in run.hooks:
            if hasattr(hook, "mark_pruned"):
                hook.mark_pruned()
        models.save_adapters(run.model, run.run_dir / "adapters")
        tracking.report_line(last["iteration"], "pruned", last["val_loss"])
        models.write_json(run.run_dir / "results.json", result)
    return result


# ------------------------------------------------------------------------------------------------ pieces


def output_dir(cfg) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():  # (after the compose API, the runtime's folder is missing: not a run)
        folder = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", throw_on_missing=False)
        if folder:
            return Path(folder)
    raise ConfigError("output_dir is not set: pass output_dir=<folder> (Hydra sets it for you from the CLI)")


def resolved_config(cfg, p: dict) -> dict:
    """The config as the run uses it: resolved, the planned steps filled in, without secrets."""
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    resolved["schedule"].update(p)
    return tracking.scrub(resolved)


def write_config(resolved: dict, run_dir: Path) -> None:
    """The resolved config in <run>/.hydra/config.yaml."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(exist_ok=True)
    tmp = hydra_dir / ".config.yaml.tmp"
    OmegaConf.save(OmegaConf.create(resolved), tmp)
    os.replace(tmp, hydra_dir / "config.yaml")


def diverged(loss: float, done: int, checkpoints: Checkpoints) -> str:
    last = (f"the last good checkpoint is {checkpoints.adapters / f'{checkpoints.last:07d}_adapters.safetensors'}"
            if checkpoints.last else "no checkpoint was saved before it")
    return (f"the training loss is {loss} at iteration {done}: stopped ({last}); lower schedule.learning_rate "
            "or check the data")


def token_source(objective) -> str:
    cached = getattr(objective, "cached", {})
    if cached and all(cached.values()):
        return "cached tokens"
    return "tokenized, cached" if cached else "tokenized"


def data_line(run: Run) -> str:
    """Where the records come from; a mixture's draw per epoch from each source."""
    d, sample = run.cfg.data, run.objective.batcher.sample
    if sample is None:
        return f"{d.source}{' ' + str(d.path) if d.path else ''} · {len(run.sets['train'])} records"
    sizes = {name: e - s for name, s, e in run.objective.sources["train"]}
    return "mix · " + " + ".join(f"{name} {n} of {sizes[name]}" for name, n in sample.per_source().items()) + \
        f" = {sum(sample.counts)} records per epoch"


def print_header(run: Run) -> None:
    from mlx.utils import tree_flatten
    from mlx_lm.cli_ui import make_console, print_header_panel

    total = sum(v.size for _, v in tree_flatten(run.model.parameters()))
    trainable = sum(v.size for _, v in tree_flatten(run.model.trainable_parameters()))
    cfg, a, s = run.cfg, run.cfg.adapter, run.cfg.schedule
    kind = a.type if a.type == "full" else f"{a.type} · rank {a.rank}"
    v = run.validator
    validated = (f"{len(v.sample)} of {len(run.sets['valid'])} validation records (a seeded sample)"
                 if v.sample is not None else f"all {len(run.sets['valid'])} validation records")
    print_header_panel(make_console(), "tuning_fork", [
        ("model", run.base if cfg.model.path != models.TINY else f"tiny ({run.base})"),
        ("adapter", f"{kind} · {trainable / 1e6:.3f}M of {total / 1e6:.3f}M parameters train"),
        ("data", data_line(run)),
        ("tokens", token_source(run.objective)),
        ("val", validated),
        ("schedule", f"{s.optimizer} · lr {s.learning_rate:g} · batch {s.batch_size}"
                     f"{' packed' if cfg.data.packing else ''} · {run.plan['iters']} iters"),
        ("run", str(run.run_dir) + (f" · resumed at iteration {run.state.step}" if run.state.step else "")),
    ])
