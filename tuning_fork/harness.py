"""Benchmark tasks through EleutherAI's lm-evaluation-harness, on a model in memory (adapters attached).

mlx-lm's harness adapter (`mlx_lm.evaluate.MLXLM`, registered as `mlxlm`) does the scoring and generating;
it loads a model from a path, so `RunModel` hands it the model we already hold instead. Tasks are the
harness's (its registry, or YAML tasks in `eval.include_path`). Results come back as the harness's results
dict; `scores()` flattens it to `eval/<task>/<metric>` names for metrics.jsonl, W&B and sweeps.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError


def require_harness():
    try:
        import lm_eval  # noqa: F401
        from mlx_lm.evaluate import MLXLM
    except ImportError:
        raise ConfigError('eval.tasks needs lm-evaluation-harness: pip install -e ".[eval]"') from None
    return MLXLM


def model_for_harness(model, tokenizer, settings):
    """An lm-eval model over `model` (mlx-lm's MLXLM, without its loading)."""
    from lm_eval.api.model import LM

    MLXLM = require_harness()

    class RunModel(MLXLM):
        def __init__(self):
            LM.__init__(self)
            self._model, self.tokenizer = model, tokenizer
            self._max_tokens, self._batch_size, self._sampler = settings.max_tokens, settings.batch_size, None
            chat = settings.apply_chat_template
            self.use_chat_template = tokenizer.chat_template is not None if chat is None else bool(chat)

    return RunModel()


def run_tasks(model, tokenizer, settings, seed: int = 0) -> dict:
    """The harness's results dict for settings.tasks (few-shot, limit and the task folder as set)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    require_harness()
    include = str(Path(settings.include_path).expanduser()) if settings.include_path else None
    if include and not Path(include).exists():
        raise ConfigError(f"eval.include_path={settings.include_path}: no such folder of task YAML files")
    manager = TaskManager(include_path=include)
    tasks = [str(t) for t in settings.tasks]
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ConfigError(f"eval.tasks: unknown task {unknown[0]!r}: name a task of lm-evaluation-harness, or put its "
                          "YAML in eval.include_path")
    lm = model_for_harness(model, tokenizer, settings)
    model.eval()
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=settings.num_fewshot, limit=settings.limit,
                                       task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                                       torch_random_seed=seed, fewshot_random_seed=seed,
                                       apply_chat_template=lm.use_chat_template)
    finally:
        model.train()


def scores(results: dict) -> dict:
    """{eval/<task>/<metric>: value}: the harness's numbers (filter suffixes like ',none' dropped; stderr kept
    out, it is in results.json)."""
    out = {}
    for task, metrics in (results or {}).get("results", {}).items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name \
                    and name not in ("sample_len", "alias"):
                out[f"eval/{task}/{name}" + (f"_{filt}" if filt not in ("", "none") else "")] = float(value)
    return out


def write_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(path)
