"""`python -m tuning_fork.evaluate`: a run's model on benchmark tasks (lm-evaluation-harness), before and after.

    python -m tuning_fork.evaluate run=RUN eval.tasks=[arc_easy,hellaswag] eval.limit=200
    python -m tuning_fork.evaluate run=RUN eval.include_path=./my_tasks eval.tasks=[my_task] eval.num_fewshot=5

Reads top to bottom: load the run's model with its adapters (as tuning_fork.generate does), run the tasks,
then the base model on the same tasks (eval.baseline=true), write RUN/eval/results.json (the harness's results
dict) and RUN/eval/baseline.json, add the scores to metrics.jsonl (and the run's W&B run), print both.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from .cli import run_app
from .config import register
from .errors import ConfigError

register()


def evaluate_run(cfg) -> dict:
    from .generate import choose_model, load_model
    from .harness import require_harness, run_tasks, scores, write_results

    if not cfg.run:
        raise ConfigError("run= is not set: point it at a finished training run's folder")
    if not cfg.eval.tasks:
        raise ConfigError("eval.tasks is empty: name the harness tasks to run, e.g. 'eval.tasks=[arc_easy]' "
                          "(or YAML tasks of your own with eval.include_path)")
    require_harness()
    run = Path(cfg.run).expanduser()
    base, adapters, adapter_config, _ = choose_model(cfg)
    model, tokenizer = load_model(cfg, base, adapters, adapter_config)
    tuned = run_tasks(model, tokenizer, cfg.eval, cfg.seed)
    write_results(tuned, run / "eval" / "results.json")
    after, before = scores(tuned), {}
    if cfg.eval.baseline:
        del model
        base_model, _ = load_model(cfg, base, None, {})
        baseline = run_tasks(base_model, tokenizer, cfg.eval, cfg.seed)
        write_results(baseline, run / "eval" / "baseline.json")
        before = scores(baseline)
    record = {**after, **{f"base_{k}": v for k, v in before.items()}}
    log(run, record)
    show(after, before, run / "eval" / "results.json")
    return record


def log(run: Path, record: dict) -> None:
    """The scores into metrics.jsonl at the run's last iteration, and into its W&B run when it had one."""
    import json

    from .tracking import MetricsFile

    results = json.loads((run / "results.json").read_text()) if (run / "results.json").exists() else {}
    at = results.get("iteration")
    MetricsFile(run).log({"iteration": at, **record})
    saved = run / ".hydra" / "config.yaml"
    ids = sorted(p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("*run-*")) if (run / "wandb").exists() else []
    if saved.exists() and ids:
        from omegaconf import OmegaConf

        from .tracking import start_wandb

        train_cfg = OmegaConf.load(saved)
        if train_cfg.get("wandb", {}).get("project"):
            w = start_wandb(train_cfg, run, {}, resume_id=ids[-1])
            w.log(record, step=at)
            w.finish()


def show(after: dict, before: dict, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="benchmark tasks (lm-evaluation-harness)")
    for col in ("task / metric", "base", "fine-tuned", "change"):
        table.add_column(col, justify="left" if col == "task / metric" else "right")
    for key, value in after.items():
        b = before.get(key)
        table.add_row(key.removeprefix("eval/"), "" if b is None else f"{b:.4f}", f"{value:.4f}",
                      "" if b is None else f"{value - b:+.4f}")
    console = Console()
    console.print(table)
    console.print(f"tuning_fork: the harness's results in {path}", highlight=False, markup=False)


@hydra.main(config_path="pkg://tuning_fork.conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_app(evaluate_run, cfg)


if __name__ == "__main__":
    main()
