"""`python -m tuning_fork.migrate old1.yaml [old2.yaml ...]`: mlx-lm / mlx-tuning-fork configs to a pipeline.

Each file becomes a stage (a list of Hydra overrides) of `conf/pipeline/NAME.yaml`, chained as
mlx-tuning-fork chained them (each stage resumes the adapters of the one before). Keys with no
equivalent are reported, and kept as comments in the written file: never silently dropped.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from .cli import command_error

# mlx-lm / mlx-tuning-fork key -> tuning_fork key
SAME = {
    "seed": "seed", "num_layers": "adapter.num_layers", "batch_size": "schedule.batch_size",
    "iters": "schedule.iters", "val_batches": "schedule.val_batches", "learning_rate": "schedule.learning_rate",
    "steps_per_report": "schedule.steps_per_report", "steps_per_eval": "schedule.steps_per_eval",
    "save_every": "schedule.save_every", "test_batches": "schedule.test_batches",
    "max_seq_length": "data.max_seq_length", "grad_checkpoint": "schedule.grad_checkpoint",
    "grad_accumulation_steps": "schedule.grad_accumulation_steps", "mask_prompt": "data.mask_prompt",
    "trust_remote_code": "model.trust_remote_code", "optimizer": "schedule.optimizer",
    "fine_tune_type": "adapter.type", "prompt_feature": "data.prompt_feature",
    "completion_feature": "data.completion_feature", "text_feature": "data.text_feature",
    "chat_feature": "data.chat_feature", "project_name": "wandb.project", "wandb_project": "wandb.project",
    "wandb_run": "wandb.run",
    # mlx-tuning-fork's epoch keys
    "epochs": "schedule.epochs", "evals_per_epoch": "schedule.evals_per_epoch",
    "saves_per_epoch": "schedule.saves_per_epoch", "eval_proportion_of_total": "schedule.eval_proportion_of_total",
    "reporting_interval_proportion": "schedule.reporting_interval_proportion",
    "validation_interval_proportion": "schedule.validation_interval_proportion",
    "validations_per_train_item": "schedule.validations_per_train_item",
    "adapter_save_interval_proportion": "schedule.adapter_save_interval_proportion",
}
# keys whose meaning tuning_fork covers by itself
IMPLIED = {
    "train": "training is what the app does",
    "test": "a test split is scored whenever data has test.jsonl",
    "adapter_path": "adapters go into each stage's run folder",
    "resume_adapter_file": "each stage starts from the previous stage's adapters",
    "report_to": "W&B logs when wandb.project is set",
    "config": "",
}
FORMATS = {"mistral", "chatml", "llama3", "alpaca", "phi", "gemma"}


def value(v) -> str:
    """A value as a Hydra override writes it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{value(x)}" for k, x in v.items()) + "}"
    s = str(v)
    if re.fullmatch(r"[\w./\-~@]+", s) and s not in ("null", "true", "false"):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def stage_overrides(old: dict, origin: str) -> tuple[list[str], list[str]]:
    """(overrides, what could not be migrated) for one old config."""
    out, unknown = [], []
    for key, v in old.items():
        if key in SAME:
            if key == "fine_tune_type" and v not in ("lora", "dora", "full"):
                unknown.append(f"{key}: {v!r} is not lora, dora or full")
                continue
            out.append(f"{SAME[key]}={value(v)}")
        elif key == "model":
            out.append(f"model.path={value(v)}")
            if str(v) != "tiny":
                out.append("schedule=default")  # the tiny model's recipe is for the tiny model only
        elif key == "data":
            local = Path(str(v)).expanduser()
            out += ["data=jsonl" if local.exists() or str(v).startswith((".", "/", "~")) else "data=hf",
                    f"data.path={value(str(local.resolve()) if local.exists() else v)}"]
        elif key == "lora_parameters":
            for k, x in (v or {}).items():
                if k in ("rank", "scale", "alpha", "dropout", "keys"):
                    out.append(f"adapter.{k}={value(x)}")
                else:
                    unknown.append(f"lora_parameters.{k}")
        elif key == "optimizer_config":
            chosen = old.get("optimizer", "adam")
            if args := (v or {}).get(chosen):
                out.append(f"schedule.optimizer_args={value(args)}")
        elif key == "lr_schedule" and v:
            arguments = list(v.get("arguments", []))
            out.append(f"schedule.lr_schedule.name={value(v.get('name'))}")
            if arguments:
                out.append(f"schedule.learning_rate={value(arguments[0])}")
                out.append(f"schedule.lr_schedule.arguments={value(arguments[1:])}")
            for k in ("warmup", "warmup_init"):
                if k in v:
                    out.append(f"schedule.lr_schedule.{k}={value(v[k])}")
        elif key in ("prompt_format", "prompt-format"):
            if v in FORMATS:
                out.append(f"prompt={v}")
            else:
                unknown.append(f"{key}: {v!r}")
        elif key in IMPLIED:
            continue
        else:
            unknown.append(key)
    if "iters" in old and "epochs" not in old:
        out.append("schedule.epochs=null")  # iters, as the old file said (epochs would win over them)
    return out, [f"{origin}: {u}" for u in unknown]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuning_fork.migrate", description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="mlx-lm / mlx-tuning-fork YAML files, in stage order")
    parser.add_argument("--name", help="the pipeline's name (default: the first file's name)")
    parser.add_argument("--conf-dir", default="conf", help="where to write pipeline/NAME.yaml (default: conf)")
    parser.add_argument("--force", action="store_true", help="replace an existing file of that name")
    args = parser.parse_args(argv)

    stages, unknown, names = [], [], []
    for path in map(Path, args.configs):
        try:
            old = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            return _fail(f"{path}: cannot read it ({e.strerror})")
        except yaml.YAMLError as e:
            return _fail(f"{path}: not YAML ({str(e).splitlines()[0]})")
        if not isinstance(old, dict):
            return _fail(f"{path}: want a mapping of mlx-lm keys, found {type(old).__name__}")
        overrides, missed = stage_overrides(old, str(path))
        name = re.sub(r"\W+", "_", path.stem).strip("_") or "stage"
        while name in names:
            name += "_"
        names.append(name)
        stages.append({"name": name, "overrides": overrides})
        unknown += missed

    pipeline = args.name or names[0]
    target = Path(args.conf_dir) / "pipeline" / f"{pipeline}.yaml"
    if target.exists() and not args.force:
        return _fail(f"{target} exists: choose another --name, or --force to replace it")
    header = [f"# Migrated from {', '.join(args.configs)} by `python -m tuning_fork.migrate`."]
    header += [f"# NOT MIGRATED: {u}" for u in unknown]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(header) + "\n" + yaml.safe_dump({"stages": stages}, sort_keys=False, width=1000))
    for u in unknown:
        print(f"not migrated (no equivalent): {u}", file=sys.stderr)
    print(f"wrote {target}\nrun it with: python -m tuning_fork --config-dir {Path(args.conf_dir)} pipeline={pipeline}")
    return 0


def _fail(message: str) -> int:
    return command_error("tuning_fork.migrate", message)


if __name__ == "__main__":
    sys.exit(main())
