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
# keys whose meaning tuning_fork covers by itself: reported as notes, written as comments
IMPLIED = {
    "train": "training is what `python -m tuning_fork` does",
    "test": "the test split is scored whenever the data has one (test.jsonl, or data.test_split)",
    "adapter_path": "adapters go to the run folder (RUN/<stage>/adapters; hydra.run.dir=... picks RUN)",
    "report_to": "W&B logs when wandb.project is set",
    "config": "",
    "clear_cache_threshold": "MLX's cache is managed by tuning_fork's loop",
}
FORMATS = {"mistral", "chatml", "llama3", "alpaca", "phi", "gemma"}
HF_KEYS = {"train_split": "data.train_split", "valid_split": "data.valid_split", "test_split": "data.test_split",
           "prompt_feature": "data.prompt_feature", "completion_feature": "data.completion_feature",
           "text_feature": "data.text_feature", "chat_feature": "data.chat_feature"}


class Loader(yaml.SafeLoader):
    """YAML as mlx-lm reads its configs: `1e-6` is a float (YAML 1.1 wants `1.0e-6`)."""


Loader.add_implicit_resolver(  # the YAML 1.2 float forms, exponent without a dot included
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


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


class Stage:
    """One old config's overrides, what could not be migrated, and notes on keys tuning_fork covers."""

    def __init__(self, old: dict, origin: str, first: bool):
        self.old, self.origin, self.first = old, origin, first
        self.out: list[str] = []
        self.unknown: list[str] = []
        self.notes: list[str] = []

    def set(self, key: str, v) -> None:
        self.out.append(f"{key}={value(v)}")

    def skip(self, what: str) -> None:
        self.unknown.append(f"{self.origin}: {what}")

    def note(self, key: str, why: str) -> None:
        self.notes.append(f"{self.origin}: {key}: {why}")


def migrate_model(st: Stage, v) -> None:
    st.set("model.path", v)  # (the default schedule and adapter take the tiny model's recipe for it alone)


def migrate_data(st: Stage, v) -> None:
    local = Path(str(v)).expanduser()
    st.out.append("data=jsonl" if local.exists() or str(v).startswith((".", "/", "~")) else "data=hf")
    st.set("data.path", str(local.resolve()) if local.exists() else v)


def migrate_hf_dataset(st: Stage, v) -> None:
    if isinstance(v, list):
        if len(v) != 1:
            return st.skip(f"hf_dataset: {len(v)} data sets (a mixture): give one, or concatenate them first")
        v = v[0]
    st.out = [o for o in st.out if not o.startswith(("data=", "data.path="))]  # hf_dataset wins over data
    st.out.append("data=hf")
    st.set("data.path", v.get("path") or v.get("name"))
    st.set("data.train_split", v.get("train_split", "train[:80%]"))  # mlx-lm's defaults
    st.set("data.valid_split", v.get("valid_split", "train[-10%:]"))
    for k, x in v.items():
        if k in HF_KEYS and k not in ("train_split", "valid_split"):
            st.set(HF_KEYS[k], x)
        elif k == "config" and isinstance(x, dict) and set(x) <= {"name"}:
            st.set("data.hf_config", x.get("name"))
        elif k not in ("path", "name", "train_split", "valid_split", "mask_prompt"):
            st.skip(f"hf_dataset.{k}")


def migrate_lora_parameters(st: Stage, v) -> None:
    for k, x in (v or {}).items():
        if k in ("rank", "scale", "alpha", "dropout", "keys"):
            st.set(f"adapter.{k}", x)
        else:
            st.skip(f"lora_parameters.{k}")


def migrate_optimizer_config(st: Stage, v) -> None:
    chosen = st.old.get("optimizer", "adam")
    for name, args in (v or {}).items():
        if name != chosen:
            if args:
                st.note(f"optimizer_config.{name}", f"not the chosen optimizer ({chosen}): not used")
            continue
        for k, x in (args or {}).items():
            st.set(f"schedule.optimizer_args.{k}", x)


def migrate_lr_schedule(st: Stage, v) -> None:
    if not v:
        return
    arguments = list(v.get("arguments", []))
    st.set("schedule.lr_schedule.name", v.get("name"))
    if arguments:  # mlx-lm passes every argument; tuning_fork passes schedule.learning_rate first
        st.set("schedule.learning_rate", arguments[0])
        st.set("schedule.lr_schedule.arguments", arguments[1:])
    for k in ("warmup", "warmup_init"):
        if k in v:
            st.set(f"schedule.lr_schedule.{k}", v[k])


def migrate_fine_tune_type(st: Stage, v) -> None:
    if v not in ("lora", "dora", "full"):
        return st.skip(f"fine_tune_type: {v!r} is not lora, dora or full")
    st.set("adapter.type", v)


def migrate_resume_adapter_file(st: Stage, v) -> None:
    if v is None:
        return
    if not st.first:
        return st.note("resume_adapter_file", "each stage starts from the previous stage's adapters (pipeline.carry)")
    folder = Path(str(v)).expanduser().parent
    st.set("init_from", str(folder.resolve()) if folder.exists() else str(folder))
    st.note("resume_adapter_file", f"init_from={folder}: the stage starts from that folder's adapters")


def migrate_training_mode(st: Stage, v) -> None:
    if v not in (None, "normal", "sft"):
        st.skip(f"training_mode: {v!r} has no equivalent yet (tuning_fork trains objective=sft)")


def migrate_prompt_format(st: Stage, v) -> None:
    if v in FORMATS:
        st.out.append(f"prompt={v}")
    else:
        st.skip(f"prompt_format: {v!r}")


SPECIAL = {"model": migrate_model, "data": migrate_data, "hf_dataset": migrate_hf_dataset,
           "lora_parameters": migrate_lora_parameters, "optimizer_config": migrate_optimizer_config,
           "lr_schedule": migrate_lr_schedule, "fine_tune_type": migrate_fine_tune_type,
           "resume_adapter_file": migrate_resume_adapter_file, "training_mode": migrate_training_mode,
           "prompt_format": migrate_prompt_format, "prompt-format": migrate_prompt_format}


def stage_overrides(old: dict, origin: str, first: bool = True) -> tuple[list[str], list[str], list[str]]:
    """(overrides, what could not be migrated, notes) for one old config."""
    st = Stage(old, origin, first)
    for key in sorted(old, key=lambda k: k == "hf_dataset"):  # hf_dataset after data, which it replaces
        v = old[key]
        if key in SPECIAL:
            SPECIAL[key](st, v)
        elif key in SAME:
            st.set(SAME[key], v)
        elif key in IMPLIED:
            if IMPLIED[key] and v is not None:
                st.note(f"{key}: {value(v)}", IMPLIED[key])
        else:
            st.skip(key)
    if "iters" in old and "epochs" not in old:
        st.out.append("schedule.epochs=null")  # iters, as the old file said (epochs would win over them)
    last = {o.split("=", 1)[0]: i for i, o in enumerate(st.out)}  # a key set twice: the file's own value wins
    return [o for i, o in enumerate(st.out) if last[o.split("=", 1)[0]] == i], st.unknown, st.notes


def composable(overrides: list[str], origin: str) -> tuple[list[str], list[str]]:
    """The overrides that compose with tuning_fork's config, and one line for each that does not."""
    from hydra import compose, initialize_config_module

    from .config import register

    register()

    def fails(ovs) -> str | None:
        try:
            with initialize_config_module("tuning_fork.conf"):
                compose("config", overrides=ovs)
        except Exception as e:
            return str(e).splitlines()[0]
        return None

    if fails(overrides) is None:
        return overrides, []
    kept, refused = [], []
    for o in overrides:
        if (why := fails(kept + [o])) is None:
            kept.append(o)
        else:
            refused.append(f"{origin}: {o} ({why})")
    return kept, refused


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuning_fork.migrate", description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="mlx-lm / mlx-tuning-fork YAML files, in stage order")
    parser.add_argument("--name", help="the pipeline's name (default: the first file's name)")
    parser.add_argument("--conf-dir", default="conf", help="where to write pipeline/NAME.yaml (default: conf)")
    parser.add_argument("--force", action="store_true", help="replace an existing file of that name")
    args = parser.parse_args(argv)

    stages, unknown, notes, names = [], [], [], []
    for n, path in enumerate(map(Path, args.configs)):
        try:
            old = yaml.load(path.read_text(), Loader=Loader) or {}
        except OSError as e:
            return _fail(f"{path}: cannot read it ({e.strerror})")
        except yaml.YAMLError as e:
            return _fail(f"{path}: not YAML ({str(e).splitlines()[0]})")
        if not isinstance(old, dict):
            return _fail(f"{path}: want a mapping of mlx-lm keys, found {type(old).__name__}")
        overrides, missed, said = stage_overrides(old, str(path), first=n == 0)
        overrides, refused = composable(overrides, str(path))
        missed += refused
        notes += said
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
    header += [f"# NOTE: {u}" for u in notes]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(header) + "\n" + yaml.safe_dump({"stages": stages}, sort_keys=False, width=1000))
    for u in unknown:
        print(f"not migrated (no equivalent): {u}", file=sys.stderr)
    for u in notes:
        print(f"note: {u}", file=sys.stderr)
    print(f"wrote {target}\nrun it with: python -m tuning_fork --config-dir {Path(args.conf_dir)} pipeline={pipeline}")
    return 0


def _fail(message: str) -> int:
    return command_error("tuning_fork.migrate", message)


if __name__ == "__main__":
    sys.exit(main())
