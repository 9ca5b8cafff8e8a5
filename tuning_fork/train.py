"""The one training entrypoint: `train(cfg) -> metrics`, called by the CLI, pipelines, sweeps and tests.

Reads top to bottom: check the config and data, load the model, fit adapters, run mlx-lm's trainer with
our batcher and callback, validate and test the result, write the run folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import config as config_schema
from . import data, models, schedule, tracking
from .errors import ConfigError, DataError, TuningForkError
from .trial import Pruned


def train(cfg: DictConfig) -> dict:
    config_schema.check(cfg)
    run_dir = output_dir(cfg)
    adapters_dir = run_dir / "adapters"
    guard_existing(run_dir)

    # 1. data, checked before any model loads
    splits = data.load_splits(cfg.data)
    n_train = len(splits["train"].records)
    if n_train < cfg.schedule.batch_size:
        raise DataError(f"{splits['train'].origin}: {n_train} training records, fewer than one batch "
                        f"(schedule.batch_size={cfg.schedule.batch_size}): lower the batch size or add records")
    base = models.resolve(cfg.model.path)
    previous = None
    if cfg.init_from:  # chain: start from a finished run's adapters (and its base)
        source, previous = models.read_run(cfg.init_from)
        base = models.chain_base(source, previous)
    s = cfg.schedule
    if s.made_for and s.made_for != cfg.model.path:
        raise ConfigError(f"model.path={cfg.model.path} with the built-in model's recipe (schedule=demo: learning "
                          f"rate {s.learning_rate:g}) that model=tiny brought: choose a schedule "
                          "for this model, e.g. schedule=default or schedule=epochs3, or a preset such as model=mistral")

    # 2. model and tokenizer; tokenized data
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tuner import trainer

    model, tokenizer = models.load(OmegaConf.merge(cfg.model, {"path": base}) if previous else cfg.model)
    sets = {name: data.encode_split(sp, tokenizer, cfg.data, cfg.prompt) for name, sp in splits.items()}
    n_train = len(sets["train"])
    iters = schedule.plan(n_train, len(sets["valid"]), s, iters=None if s.epochs is not None else s.iters)["iters"]

    # 3. adapters
    mx.random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    adapter_config = {"model": base, **models.attach(model, cfg.adapter, cfg.model)}
    if previous and previous.get("fine_tune_type") != "full":
        models.check_chain(cfg.init_from, previous, adapter_config)
        models.load_previous(model, source)
    adapters_dir.mkdir(parents=True, exist_ok=True)
    models.write_json(adapters_dir / "adapter_config.json", adapter_config)
    write_config(cfg, run_dir, iters)
    optimizer = build_optimizer(s, updates=math.ceil(iters / s.grad_accumulation_steps))

    # 4. train with mlx-lm's loop; our batcher, our callback
    wandb_run = tracking.start_wandb(cfg, run_dir, OmegaConf.to_container(cfg, resolve=True))
    metrics = tracking.Metrics(run_dir, wandb_run)
    reporter = None
    if cfg.optuna.trial_id is not None:  # a job of an Optuna sweep: report to its trial
        from .trial import TrialReporter

        reporter = TrialReporter(cfg.optuna, run_dir)
    checkpoints = Checkpoints(model, adapters_dir, s.save_every, s.grad_accumulation_steps, s.keep_checkpoints)
    batcher = data.Batcher(seed=cfg.seed, on_step=checkpoints.on_step)
    args = trainer.TrainingArgs(
        batch_size=s.batch_size,
        iters=iters,
        val_batches=s.val_batches,
        steps_per_report=s.steps_per_report,
        steps_per_eval=s.steps_per_eval,
        steps_per_save=iters + 1,  # we checkpoint ourselves (Checkpoints), atomically
        max_seq_length=cfg.data.max_seq_length,
        adapter_file=str(adapters_dir / ".final.safetensors"),  # mlx-lm's own last save: renamed below
        grad_checkpoint=s.grad_checkpoint,
        grad_accumulation_steps=s.grad_accumulation_steps,
    )
    print_header(cfg, base, model, n_train, iters)
    mx.reset_peak_memory()
    try:
        try:
            trainer.train(model, optimizer, sets["train"], sets["valid"], args=args,
                          iterate_batches=batcher, training_callback=Callback(metrics, reporter))
        except Pruned as stop:  # the sweep's pruner gave up on this trial: keep what it learned, say so
            reporter.mark_pruned()
            models.save_adapters(model, adapters_dir)
            report_line(metrics.val_losses[-1][0], "pruned", metrics.val_losses[-1][1])
            result = {**metrics.summary(), "pruned": True, "reason": str(stop)}
            models.write_json(run_dir / "results.json", result)
            return result
        os.replace(adapters_dir / ".final.safetensors", adapters_dir / "adapters.safetensors")
        checkpoints.save(iters)

        # 5. the final model: validation after the last step (mlx-lm's last one ran before it), then test
        val_loss = evaluate(model, sets["valid"], s, cfg, batcher, s.val_batches)
        metrics.val_report(iters, val_loss)
        if reporter is not None and math.isfinite(val_loss):
            reporter.trial.report(val_loss, iters)
        report_line(iters, "val", val_loss)
        result = metrics.summary()
        if "test" in sets:
            test_loss = evaluate(model, sets["test"], s, cfg, batcher, s.test_batches)
            result.update(test_loss=test_loss, test_ppl=math.exp(min(test_loss, 700)))
            metrics.log({"iteration": iters, "test_loss": test_loss, "test_ppl": result["test_ppl"]})
            report_line(iters, "test", test_loss, f"ppl {result['test_ppl']:.2f}")
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    result.update(iters=iters, peak_memory=mx.get_peak_memory() / 1e9, run_dir=str(run_dir))
    models.write_json(run_dir / "results.json", result)
    return result


# ------------------------------------------------------------------------------------------------ pieces


def output_dir(cfg) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ConfigError("output_dir is not set: pass output_dir=<folder> (Hydra sets it for you from the CLI)")


def guard_existing(run_dir: Path) -> None:
    """Never write a new run over a finished one."""
    for name in ("adapters/adapters.safetensors", "metrics.jsonl"):
        if (run_dir / name).exists():
            raise ConfigError(f"{run_dir} already holds a run ({name}): choose a new hydra.run.dir, "
                              "or move that folder away first")
    run_dir.mkdir(parents=True, exist_ok=True)


def write_config(cfg, run_dir: Path, iters: int) -> None:
    """The resolved config, as the run used it, in <run>/.hydra/config.yaml."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["schedule"]["iters"] = iters
    OmegaConf.save(OmegaConf.create(tracking.scrub(resolved)), hydra_dir / "config.yaml")


def build_optimizer(s, updates: int):
    import mlx.optimizers as optim

    lr = s.learning_rate
    if s.lr_schedule.name or s.lr_schedule.warmup:
        lr = build_lr_schedule(s.learning_rate, s.lr_schedule, updates)
    cls = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD, "adafactor": optim.Adafactor,
           "muon": optim.Muon}[s.optimizer]
    try:
        return cls(learning_rate=lr, **s.optimizer_args)
    except TypeError as e:
        raise ConfigError(f"schedule.optimizer_args={dict(s.optimizer_args)}: {s.optimizer} does not take "
                          f"them ({e})") from None


def build_lr_schedule(peak: float, sc, updates: int):
    """mlx's schedulers, with lengths counted in optimizer updates and sensible default arguments."""
    import mlx.optimizers as optim

    name = sc.name or "constant"
    fn = (lambda peak: lambda step: peak) if name == "constant" else getattr(optim.schedulers, name, None)
    names = [n for n in dir(optim.schedulers) if n.endswith(("_decay", "_schedule")) and n != "join_schedules"]
    if fn is None or not callable(fn):
        raise ConfigError(f"schedule.lr_schedule.name={name}: unknown: choose one of {', '.join(names)}")
    decay = max(1, updates - sc.warmup)
    defaults = {"cosine_decay": [decay], "linear_schedule": [0.0, decay]}
    arguments = list(sc.arguments) or defaults.get(name, [])
    try:
        schedule = fn(peak, *arguments)
    except TypeError as e:
        raise ConfigError(f"schedule.lr_schedule.arguments={arguments}: wrong for {name} ({e})") from None
    if sc.warmup > 0:
        warm = optim.schedulers.linear_schedule(sc.warmup_init, peak, sc.warmup)
        schedule = optim.schedulers.join_schedules([warm, schedule], [sc.warmup])
    return schedule


def evaluate(model, dataset, s, cfg, batcher, num_batches) -> float:
    from mlx_lm.tuner.trainer import evaluate as mlx_evaluate

    loss = mlx_evaluate(model, dataset, batch_size=s.batch_size, num_batches=num_batches,
                        max_seq_length=cfg.data.max_seq_length, iterate_batches=batcher)
    model.train()
    return loss


class Checkpoints:
    """Every `save_every` steps (on optimizer-update boundaries): adapters.safetensors and a numbered copy
    (mlx-lm's names), each written atomically; only the newest `keep` numbered copies stay."""

    def __init__(self, model, folder: Path, every: int, accumulation: int, keep: int | None):
        self.model, self.folder, self.every, self.accumulation, self.keep = model, folder, every, accumulation, keep

    def on_step(self, done: int) -> None:
        if done and done % self.every == 0 and done % self.accumulation == 0:
            models.save_adapters(self.model, self.folder)
            self.save(done)

    def save(self, done: int) -> None:
        import shutil

        numbered = self.folder / f"{done:07d}_adapters.safetensors"
        tmp = self.folder / f".{numbered.name}.tmp"
        shutil.copyfile(self.folder / "adapters.safetensors", tmp)
        os.replace(tmp, numbered)
        if self.keep:
            for old in sorted(self.folder.glob("[0-9]" * 7 + "_adapters.safetensors"))[:-self.keep]:
                old.unlink()


class Callback:
    """mlx-lm's TrainingCallback: reports go to metrics.jsonl (and W&B); a diverged loss stops the run."""

    def __init__(self, metrics: tracking.Metrics, reporter=None):
        self.metrics, self.reporter = metrics, reporter

    def on_train_loss_report(self, info: dict) -> None:
        self.metrics.train_report(info)
        if not math.isfinite(info["train_loss"]):
            raise TuningForkError(f"the training loss is {info['train_loss']} at iteration {info['iteration']}: "
                                  "lower schedule.learning_rate (or check the data)")

    def on_val_loss_report(self, info: dict) -> None:
        # mlx-lm validates before the step it names: info["iteration"] is already the steps completed
        self.metrics.val_report(info["iteration"], info["val_loss"], info.get("val_time"))
        if self.reporter is not None:
            self.reporter.report(info["iteration"], info["val_loss"])


def print_header(cfg, base, model, n_train, iters) -> None:
    from mlx_lm.cli_ui import make_console, print_header_panel
    from mlx.utils import tree_flatten

    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    a, s = cfg.adapter, cfg.schedule
    kind = a.type if a.type == "full" else f"{a.type} · rank {a.rank}"
    print_header_panel(make_console(), "tuning_fork", [
        ("model", base if cfg.model.path != models.TINY else f"tiny ({base})"),
        ("adapter", f"{kind} · {trainable / 1e6:.3f}M of {total / 1e6:.3f}M parameters train"),
        ("data", f"{cfg.data.source}{' ' + str(cfg.data.path) if cfg.data.path else ''} · {n_train} records"),
        ("schedule", f"{s.optimizer} · lr {s.learning_rate:g} · batch {s.batch_size} · {iters} iters"),
        ("run", str(output_dir(cfg))),
    ])


def report_line(it: int, what: str, loss: float, extra: str = "") -> None:
    from mlx_lm.cli_ui import make_console

    make_console().print(f"  [ui.muted]{it:>4}[/ui.muted]    [ui.accent]{what}[/ui.accent] "
                         f"[ui.strong]{loss:>5.3f}[/ui.strong]    [ui.muted]{extra}[/ui.muted]")
