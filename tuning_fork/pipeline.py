"""Stages: several trainings in one command, each starting from the one before.

`pipeline=cpt_sft` lists stages; each stage is a list of Hydra overrides composed on top of the run's own
overrides (the command line wins). Stage N trains into <run>/<name>/ with `init_from` the stage before it,
so LoRA resumes LoRA and a full fine-tune becomes the next stage's base. Every chain is checked before
the first stage trains.
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig

from .errors import ConfigError

# keys the pipeline sets on each stage itself
_OWN = ("pipeline", "output_dir", "init_from", "hydra.", "summary")


def stage_configs(cfg, run_dir: Path) -> list[tuple[str, object]]:
    """(name, composed config) of every stage, in order."""
    user = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(_OWN)]
    names = [st.name for st in cfg.pipeline.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"pipeline stages must have distinct names, got {names}")
    out, previous = [], cfg.init_from
    evaluated = any(st.app == "evaluate" for st in cfg.pipeline.stages)
    for st in cfg.pipeline.stages:
        if st.app != "train":
            out.append((st.name, other_app(st, user, previous, run_dir)))
            continue
        overrides = _merge(list(st.overrides), user)
        if evaluated:  # the benchmark tasks run in the evaluate stage, once, not after every training stage
            overrides += ["eval.tasks=[]"] + (["optimized_metric=best_val_loss"]
                                              if str(cfg.optimized_metric).startswith("eval/") else [])
        overrides += [f"output_dir={run_dir / st.name}", f"summary={cfg.summary}", f"pipeline.carry={cfg.pipeline.carry}"]
        if previous:
            overrides.append(f"init_from={previous}")
        if cfg.wandb.project:
            overrides += [f"wandb.group={cfg.wandb.group or run_dir.name}",
                          f"wandb.run={(cfg.wandb.run or run_dir.name)}-{st.name}"]
        try:
            stage_cfg = compose(config_name="config", overrides=overrides)
        except Exception as e:
            raise ConfigError(f"pipeline stage {st.name}: {str(e).splitlines()[0]}") from None
        out.append((st.name, stage_cfg))
        previous = str(run_dir / st.name)
    return out


def other_app(st, user: list[str], previous: str | None, run_dir: Path):
    """An export or evaluate stage's config: its app's, on the stage before (run=); the command line's eval.*
    settings reach an evaluate stage."""
    if not previous:
        raise ConfigError(f"pipeline stage {st.name} ({st.app}) needs a training stage before it")
    overrides = list(st.overrides) + [f"run={previous}"]
    if st.app == "export":
        overrides += [f"out={run_dir / st.name}", "overwrite=true"]
    else:
        overrides = _merge(overrides, [o for o in user if o.lstrip("+~").startswith(("eval.", "seed="))])
    try:
        return compose(config_name=str(st.app), overrides=overrides)
    except Exception as e:
        raise ConfigError(f"pipeline stage {st.name}: {str(e).splitlines()[0]}") from None


def _merge(stage: list[str], user: list[str]) -> list[str]:
    """The stage's overrides, then the user's; a key given by both keeps the user's value."""
    key = lambda o: o.split("=", 1)[0].lstrip("+~")
    users = {key(o) for o in user}
    return [o for o in stage if key(o) not in users] + user


def check_chain(stages) -> None:
    """Every consecutive pair of stages must carry adapters over; found before anything trains."""
    stages = [(name, c) for name, c in stages if "schedule" in c and c.schedule is not None and "data" in c]
    for (a_name, a), (b_name, b) in zip(stages, stages[1:]):
        if a.adapter.type == "full":
            continue
        diffs = [f"{k} {a.adapter[k]} -> {b.adapter[k]}" for k in ("type", "rank", "num_layers")
                 if a.adapter[k] != b.adapter[k]]
        if a.adapter.get("keys") != b.adapter.get("keys"):
            diffs.append(f"keys {a.adapter.get('keys')} -> {b.adapter.get('keys')}")
        if a.model.quantize_bits != b.model.quantize_bits:
            diffs.append(f"model.quantize_bits {a.model.quantize_bits} -> {b.model.quantize_bits}")
        if diffs:
            raise ConfigError(f"pipeline stage {b_name} cannot start from stage {a_name}'s adapters "
                              f"({'; '.join(diffs)}): give both stages the same adapter settings")


def run_pipeline(cfg, run_dir: Path) -> dict:
    from .train import train

    stages = stage_configs(cfg, run_dir)
    check_chain(stages)
    if cfg.pipeline.only:
        names = [n for n, _ in stages]
        if cfg.pipeline.only not in names:
            raise ConfigError(f"pipeline.only={cfg.pipeline.only}: no such stage (stages: {', '.join(names)})")
        i = names.index(cfg.pipeline.only)
        stages = [stages[i]]
        if i > 0 and not (run_dir / names[i - 1] / "adapters" / "adapters.safetensors").exists():
            stages[0][1].init_from = cfg.init_from  # no earlier stage here: start from scratch (or init_from)
    results = {}
    for name, stage_cfg in stages:
        if "data" not in stage_cfg:  # an export or evaluate stage
            results[name] = use_stage(name, stage_cfg, cfg.summary)
            continue
        folder = Path(stage_cfg.output_dir)
        if cfg.resume and not cfg.summary:  # continue the pipeline: skip finished stages, resume the stopped one
            if (folder / "results.json").exists():
                print(f"== stage {name}: finished in {folder} (resume=true: kept)")
                results[name] = json.loads((folder / "results.json").read_text())
                continue
            if not (folder / "checkpoints").exists() and not (folder / "metrics.jsonl").exists():
                stage_cfg.resume = False  # this stage never started: start it
        print(f"== stage {name} -> {stage_cfg.output_dir}")
        if cfg.summary:
            from .summary import summarize

            summarize(stage_cfg)
            continue
        results[name] = train(stage_cfg)
    last = results[stages[-1][0]] if results else {}
    return {**last, "stages": results}


def use_stage(name: str, stage_cfg, summary: bool) -> dict:
    """Run an export or evaluate stage (nothing under summary=true)."""
    app = "export" if "format" in stage_cfg else "evaluate"
    print(f"== stage {name} ({app}) <- {stage_cfg.run}")
    if summary:
        return {}
    if app == "export":
        from .export import export

        return {"export": str(export(stage_cfg))}
    from .evaluate import evaluate_run

    return evaluate_run(stage_cfg)
