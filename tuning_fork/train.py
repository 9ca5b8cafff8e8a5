"""The one training entrypoint: `train(cfg) -> metrics`, called by the CLI, pipelines, sweeps and tests.

Reads top to bottom: check the config and the data, tokenize, load the model, attach adapters (or restore
a checkpoint), then the loop — one compiled step at a time (tuning_fork/step.py), with reports,
validations and checkpoints on the plan's intervals — and finally the test split and results.json.
Every rank of a data-parallel run runs this; rank 0 alone writes (tuning_fork/distributed.py).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import config as config_schema
from . import data, distributed, models, schedule, tracking
from .checkpoint import Checkpoints, Interrupted, StopSignals
from .errors import ConfigError, DataError, TuningForkError
from .step import HostPace, direct_cuda_launches, evaluate, make_step
from .trial import Pruned


def train(cfg: DictConfig) -> dict:
    config_schema.check(cfg)
    s = cfg.schedule
    direct = direct_cuda_launches()  # before any kernel runs
    group = distributed.world()  # one process, or one of the ranks mlx.launch started
    rank = group.rank()
    distributed.check_batch(s.batch_size, group.size())
    run_dir = Path(distributed.share_text(group, str(output_dir(cfg).resolve())))
    checkpoints = Checkpoints(run_dir, s.keep_checkpoints)
    if rank == 0:
        tracking.scrub_hydra_files(run_dir)
    resume_from = find_resume(cfg, run_dir, checkpoints)
    distributed.barrier(group)  # every rank has looked at the folder before rank 0 writes to it

    # 1. data, checked before any model loads
    splits = data.load_splits(cfg.data)
    n_train = len(splits["train"].records)
    if n_train < s.batch_size:
        raise DataError(f"{splits['train'].origin}: {n_train} training records, fewer than one batch "
                        f"(schedule.batch_size={s.batch_size}): lower the batch size or add records")
    base = models.resolve(cfg.model.path)
    previous = None
    if cfg.init_from:  # chain: start from a finished run's adapters (and its base)
        source, previous = models.read_run(cfg.init_from)
        base = models.chain_base(source, previous)
    if s.made_for and s.made_for != cfg.model.path:
        raise ConfigError(f"model.path={cfg.model.path} with the built-in model's recipe (schedule=demo: learning "
                          f"rate {s.learning_rate:g}) that model=tiny brought: choose a schedule "
                          "for this model, e.g. schedule=default or schedule=epochs3, or a preset such as model=mistral")

    # 2. tokenized data (records over max_seq_length are found here, before any weights load); the plan
    import mlx.core as mx
    import numpy as np
    from mlx_lm.cli_ui import TrainUI

    tokenizer = models.load_tokenizer(base, cfg.model.trust_remote_code)
    sets = {}
    for name, split in splits.items():
        sets[name], note = data.limit_lengths(data.encode_split(split, tokenizer, cfg.data, cfg.prompt),
                                              split, cfg.data)
        if note and rank == 0:
            print(f"tuning_fork: {note}")
    batcher = data.Batcher(s.batch_size, cfg.data.max_seq_length, cfg.seed, cfg.data.packing, rank, group.size())
    units = batcher.rows_per_epoch(sets["train"]) if cfg.data.packing else len(sets["train"])
    p = plan_steps(cfg, units, len(sets["valid"]))
    iters = p["iters"]
    model, _ = models.load(OmegaConf.merge(cfg.model, {"path": base}) if previous else cfg.model)

    # 3. the model's adapters and optimizer; a resumed run takes both, and where it was, from its last checkpoint
    mx.random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    adapter_config = {"model": base, **models.attach(model, cfg.adapter, cfg.model)}
    if previous and previous.get("fine_tune_type") != "full":
        models.check_chain(cfg.init_from, previous, adapter_config)
        models.load_previous(model, source)
    optimizer = build_optimizer(s, updates=math.ceil(iters / s.grad_accumulation_steps))
    resolved = resolved_config(cfg, p)
    state = {"step": 0, "window": [0.0, 0, 0, 0.0], "trained_tokens": 0, "wandb_id": None, "config": resolved}
    if resume_from is not None:
        state = checkpoints.restore(resume_from, model, optimizer)
        check_same_config(state["config"], resolved, resume_from)
    if rank == 0:
        run_dir.joinpath("adapters").mkdir(parents=True, exist_ok=True)
        models.write_json(run_dir / "adapters" / "adapter_config.json", adapter_config)
        write_config(resolved, run_dir)
    step, state_arrays = make_step(model, optimizer, s.grad_accumulation_steps, s.grad_checkpoint, s.loss_chunk)

    # 4. the loop: one step at a time; reports, validations and checkpoints on the plan's intervals
    wandb_run = tracking.start_wandb(cfg, run_dir, resolved, state["wandb_id"]) if rank == 0 else None
    state["wandb_id"] = wandb_run.id if wandb_run is not None else None
    metrics = tracking.Metrics(run_dir, wandb_run, write=rank == 0)
    if resume_from is not None:
        metrics.resume(state["step"])
    reporter = None
    if cfg.optuna.trial_id is not None:  # a job of an Optuna sweep: report to its trial
        from .trial import TrialReporter

        reporter = TrialReporter(cfg.optuna, run_dir)
    if rank == 0:
        print_header(cfg, base, model, len(sets["train"]), iters, run_dir, state["step"])

    val_total = math.ceil(len(sets["valid"]) / s.batch_size)
    if p["val_batches"] != -1:
        val_total = min(val_total, p["val_batches"])

    def validate(done: int, ui) -> float:
        tic = time.perf_counter()
        with ui.val_task(val_total) as advance:
            loss = evaluate(model, sets["valid"], batcher, s.batch_size, p["val_batches"],
                            cfg.data.max_seq_length, advance)
        seconds = time.perf_counter() - tic
        ui.report_val(done, loss, seconds)
        metrics.val_report(done, loss, seconds)
        return loss

    def save(done: int) -> None:
        if rank == 0:
            checkpoints.save(done, model, optimizer, state)
        distributed.barrier(group)  # no rank runs ahead of a checkpoint it might need

    start = state["step"]
    window_loss, window_toks, window_steps, window_time = state["window"]
    grad = None
    mx.reset_peak_memory()
    model.train()
    ui = TrainUI(iters, rank=rank)
    pace = None
    try:
        with ui, StopSignals() as stop:
            for _ in range(start):
                ui.advance()
            if start == 0:
                loss = validate(0, ui)
                if reporter is not None:
                    reporter.report(0, loss)
            batches = batcher.train(sets["train"], start)
            pace = HostPace(direct)
            for done in range(start + 1, iters + 1):
                tic = time.perf_counter()
                mx.random.seed(cfg.seed * 1_000_003 + done)  # dropout's draws depend on the step alone
                boundary = done % s.grad_accumulation_steps == 0 or done == iters
                batch = next(batches)
                pace.before(batch[0].size)
                value, toks, grad = step(batch, grad, boundary)
                mx.eval(state_arrays, value, toks, grad)
                pace.stepped(boundary)
                window_loss += value.item()
                window_toks += int(toks.item())
                window_steps += 1
                window_time += time.perf_counter() - tic
                if group.size() == 1 and not math.isfinite(window_loss):
                    raise TuningForkError(diverged(window_loss, done, checkpoints))
                ui.advance()
                stopping = boundary and distributed.all_sum(group, int(stop.signal is not None)) > 0
                if done % p["steps_per_report"] == 0 or done == iters:
                    train_loss = distributed.all_sum(group, window_loss) / (window_steps * group.size())
                    tokens = distributed.all_sum(group, window_toks)
                    state["trained_tokens"] += tokens
                    if not math.isfinite(train_loss):
                        raise TuningForkError(diverged(train_loss, done, checkpoints))
                    ui.report_train(done, train_loss, tokens / window_time, state["trained_tokens"])
                    metrics.train_report({"iteration": done, "train_loss": train_loss,
                                          "learning_rate": optimizer.learning_rate.item(),
                                          "tokens_per_second": tokens / window_time,
                                          "trained_tokens": state["trained_tokens"],
                                          "peak_memory": mx.get_peak_memory() / 1e9})
                    window_loss, window_toks, window_steps, window_time = 0.0, 0, 0, 0.0
                if done % p["steps_per_eval"] == 0 or done == iters:
                    loss = validate(done, ui)
                    if reporter is not None and done < iters:
                        reporter.report(done, loss)
                if boundary and (done % p["save_every"] == 0 or done == iters or stopping):
                    if not math.isfinite(distributed.all_sum(group, window_loss)):
                        raise TuningForkError(diverged(window_loss, done, checkpoints))
                    state.update(window=[window_loss, window_toks, window_steps, window_time])
                    save(done)
                if stopping:
                    raise Interrupted(stop.signal, done, iters, run_dir)
        # 5. the final model: its validation (the last report above) goes to the sweep; then the test split
        result = metrics.summary()
        if reporter is not None and math.isfinite(result["val_loss"]):
            reporter.trial.report(result["val_loss"], iters)
        if "test" in sets:
            test_loss = evaluate(model, sets["test"], batcher, s.batch_size, s.test_batches, cfg.data.max_seq_length)
            result.update(test_loss=test_loss, test_ppl=math.exp(min(test_loss, 700)))
            metrics.log({"iteration": iters, "test_loss": test_loss, "test_ppl": result["test_ppl"]})
            if rank == 0:
                report_line(iters, "test", test_loss, f"ppl {result['test_ppl']:.2f}")
    except Pruned as stopped:  # the sweep's pruner gave up on this trial: keep what it learned, say so
        reporter.mark_pruned()
        models.save_adapters(model, run_dir / "adapters")
        report_line(metrics.val_losses[-1][0], "pruned", metrics.val_losses[-1][1])
        result = {**metrics.summary(), "pruned": True, "reason": str(stopped)}
        models.write_json(run_dir / "results.json", result)
        return result
    finally:
        if pace is not None:
            pace.close()
        if wandb_run is not None:
            wandb_run.finish()
    result.update(iters=iters, peak_memory=mx.get_peak_memory() / 1e9, run_dir=str(run_dir))
    if rank == 0:
        models.write_json(run_dir / "results.json", result)
        print(f"tuning_fork: adapters in {run_dir / 'adapters'}; next: python -m tuning_fork.generate "
              f"run={run_dir} \"prompt.text=...\" · python -m tuning_fork.plot {run_dir}")
    return result


# ------------------------------------------------------------------------------------------------ pieces


def output_dir(cfg) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ConfigError("output_dir is not set: pass output_dir=<folder> (Hydra sets it for you from the CLI)")


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


def plan_steps(cfg, units: int, n_valid: int) -> dict:
    """The schedule in steps for `units` training rows per epoch (records, or packed rows): derived keys
    from the plan, explicit ones as set."""
    s = cfg.schedule
    derived = schedule.plan(units, n_valid, s, iters=None if s.epochs is not None else s.iters)
    out = {k: derived[k] if k == "iters" or OmegaConf.is_interpolation(s, k) else s[k] for k in schedule.DERIVED}
    for k in ("steps_per_eval", "steps_per_report", "save_every"):
        out[k] = min(out[k], out["iters"])
    return out


def resolved_config(cfg, p: dict) -> dict:
    """The config as the run uses it: resolved, the planned steps filled in, without secrets."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["schedule"].update(p)
    return tracking.scrub(resolved)


def write_config(resolved: dict, run_dir: Path) -> None:
    """The resolved config in <run>/.hydra/config.yaml."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(exist_ok=True)
    tmp = hydra_dir / ".config.yaml.tmp"
    OmegaConf.save(OmegaConf.create(resolved), tmp)
    os.replace(tmp, hydra_dir / "config.yaml")


IGNORED_ON_RESUME = ("resume", "output_dir", "wandb")


def check_same_config(saved: dict, now: dict, folder: Path) -> None:
    """A resumed run must be the run that stopped: same model, data, schedule and adapter."""

    def walk(a, b, prefix=""):
        for key in sorted(set(a) | set(b)):
            path = f"{prefix}{key}"
            if not prefix and key in IGNORED_ON_RESUME:
                continue
            x, y = a.get(key), b.get(key)
            if isinstance(x, dict) and isinstance(y, dict):
                walk(x, y, path + ".")
            elif x != y:
                raise ConfigError(f"resume=true: {path}={y!r}, but the interrupted run used {path}={x!r} "
                                  f"({folder}/state.json): resume with the same settings")

    walk(saved, now)


def diverged(loss: float, done: int, checkpoints: Checkpoints) -> str:
    last = (f"the last good checkpoint is {checkpoints.adapters / f'{checkpoints.last:07d}_adapters.safetensors'}"
            if checkpoints.last else "no checkpoint was saved before it")
    return (f"the training loss is {loss} at iteration {done}: stopped ({last}); lower schedule.learning_rate "
            "or check the data")


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


def print_header(cfg, base, model, n_train, iters, run_dir, start) -> None:
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
        ("schedule", f"{s.optimizer} · lr {s.learning_rate:g} · batch {s.batch_size}"
                     f"{' packed' if cfg.data.packing else ''} · {iters} iters"),
        ("run", str(run_dir) + (f" · resumed at iteration {start}" if start else "")),
    ])


def report_line(it: int, what: str, loss: float, extra: str = "") -> None:
    from mlx_lm.cli_ui import make_console

    make_console().print(f"  [ui.muted]{it:>4}[/ui.muted]    [ui.accent]{what}[/ui.accent] "
                         f"[ui.strong]{loss:>5.3f}[/ui.strong]    [ui.muted]{extra}[/ui.muted]")
