"""Typed schemas for every config group, registered in Hydra's ConfigStore.

`conf/config.yaml` puts `tuning_fork_schema` first in its defaults list, so every option of every group is
merged into these dataclasses: a misspelled key or a value of the wrong type fails at composition, before
any model loads. Range checks Hydra cannot express live in `check()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .errors import ConfigError

FINE_TUNE_TYPES = ("lora", "dora", "full", "qlora")
OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor", "muon")
DATA_SOURCES = ("demo", "jsonl", "hf")
TOO_LONG = ("truncate", "drop", "error")
PROMPT_FORMATS = ("tokenizer", "chatml", "llama3", "mistral", "alpaca", "phi", "gemma")


@dataclass
class ModelConfig:
    path: str = "tiny"  # a Hugging Face id, a local folder, or `tiny` (built in)
    trust_remote_code: bool = False
    revision: Optional[str] = None
    # QLoRA: quantize an unquantized base before fitting adapters. adapter=qlora uses 4 bits when unset.
    quantize_bits: Optional[int] = None
    quantize_group_size: int = 64


@dataclass
class DataConfig:
    source: str = "demo"  # demo | jsonl | hf
    path: Optional[str] = None  # jsonl: folder with train/valid[/test].jsonl; hf: the data set id
    # hf only: split expressions and the data set's configuration name
    hf_config: Optional[str] = None
    train_split: str = "train"
    valid_split: Optional[str] = "validation"
    test_split: Optional[str] = None
    # the record fields, as mlx-lm names them
    text_feature: str = "text"
    prompt_feature: str = "prompt"
    completion_feature: str = "completion"
    chat_feature: str = "messages"
    mask_prompt: bool = False  # completion-only loss
    max_seq_length: int = 2048
    too_long: str = "truncate"  # records over max_seq_length tokens: truncate | drop | error
    packing: bool = False  # several records per row (up to max_seq_length), attention kept within each record


@dataclass
class LRScheduleConfig:
    name: Optional[str] = None  # null: a constant rate; else an mlx.optimizers.schedulers function, e.g. cosine_decay
    arguments: List[Any] = field(default_factory=list)  # its positional arguments after the peak rate
    warmup: int = 0  # linear warmup, in optimizer updates
    warmup_init: float = 0.0


def derived(key: str):
    """The default of a derived schedule key: computed from epochs and the data's size (schedule.py)."""
    return field(default="${tf.plan:%s}" % key)


@dataclass
class EarlyStoppingConfig:
    patience: Optional[int] = None  # validations without an improvement before the run ends; null: never
    min_delta: float = 0.0  # an improvement must be larger than this to count
    metric: str = "val_loss"  # the monitored metric (also picks the best adapter): val_loss or val_<task metric>
    mode: str = "auto"  # auto (task metrics up, losses down) | min | max


@dataclass
class ScheduleConfig:
    batch_size: int = 4  # global: split across data-parallel ranks
    learning_rate: float = 1e-5
    optimizer: str = "adam"
    optimizer_args: Dict[str, Any] = field(default_factory=dict)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    grad_accumulation_steps: int = 1
    grad_checkpoint: bool = False
    loss_chunk: Optional[int] = None  # logits this many positions at a time (big vocabularies); null: all at once
    # the plan in epochs and proportions (mlx-tuning-fork's names); see tuning_fork/schedule.py
    epochs: Optional[float] = None  # wins over iters; with neither, one epoch
    evals_per_epoch: Optional[float] = None
    eval_proportion_of_total: float = 0.25
    reporting_interval_proportion: float = 0.01
    validation_interval_proportion: float = 0.2
    validations_per_train_item: float = 0.5
    saves_per_epoch: Optional[float] = 2
    adapter_save_interval_proportion: float = 0.1
    # intervals in units ("0.25ep", "100it"): win over the proportions when set
    eval_every: Optional[str] = None
    report_every: Optional[str] = None
    checkpoint_every: Optional[str] = None
    # mlx-lm's keys: derived from the above unless set explicitly
    iters: int = derived("iters")
    steps_per_eval: int = derived("steps_per_eval")
    steps_per_report: int = derived("steps_per_report")
    save_every: int = derived("save_every")
    val_batches: int = derived("val_batches")  # -1: the whole validation set
    test_batches: int = -1
    keep_checkpoints: Optional[int] = None  # numbered checkpoints to keep (the newest); null: all
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    final_validation: str = "full"  # full: the last validation also scores the whole split | sample
    made_for: Optional[str] = None  # the model.path this schedule is a recipe for (schedule=demo: tiny)


@dataclass
class AdapterConfig:
    type: str = "lora"  # lora | dora | full | qlora
    rank: int = 8
    alpha: float = 16.0  # PEFT-style; mlx-lm's scale = alpha / rank
    scale: Optional[float] = None  # mlx-lm's scale directly; wins over alpha when set
    dropout: float = 0.0
    keys: Optional[List[str]] = None  # module paths inside each block, e.g. [self_attn.q_proj]; null: all linears
    num_layers: int = -1  # blocks from the top to adapt; -1 (or more than the model has): all


@dataclass
class PromptConfig:
    format: str = "tokenizer"  # tokenizer | chatml | llama3 | mistral | alpaca | phi | gemma
    system: Optional[str] = None
    text: Optional[str] = None
    # Word Loom (generation): sections of a TOML loom file build the system, context and user texts
    loom_file: Optional[str] = None
    build_prompt: Any = None  # 1-3 section names ("system_prompt context question" or a list); [file.txt] reads a file
    loom_markers: Any = None  # "name=[value] other=[value two]" or a mapping: fills {name} in the sections
    allow_outside_files: bool = False  # may a [file] section read outside the loom file's folder?


@dataclass
class GenerateEvalConfig:
    records: int = 0  # validation records answered greedily at each validation; 0: off
    max_tokens: int = 64
    metrics: List[str] = field(default_factory=lambda: ["exact_match", "token_f1", "rouge_l"])


@dataclass
class EvalConfig:
    generate: GenerateEvalConfig = field(default_factory=GenerateEvalConfig)


@dataclass
class ObjectiveConfig:
    name: str = "sft"  # sft: next-token loss on the targets of each record


@dataclass
class WandbConfig:
    project: Optional[str] = None  # null: no W&B
    run: Optional[str] = None
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    sweep_id: Optional[str] = None  # set by the W&B sweeper: the run belongs to this sweep


@dataclass
class StageConfig:
    name: str = MISSING
    overrides: List[str] = field(default_factory=list)  # Hydra overrides applied on top of the run's config


@dataclass
class PipelineConfig:
    stages: List[StageConfig] = field(default_factory=list)  # empty: a single run, no pipeline
    only: Optional[str] = None  # run this stage alone (chained from an earlier stage's folder if present)
    carry: str = "best"  # what the next stage starts from: the stage's best adapters, or its last


@dataclass
class OptunaTrialConfig:
    """Set by the tuning_fork_optuna sweeper for each job: which trial to report to."""

    storage: Optional[str] = None
    study: Optional[str] = None
    trial_id: Optional[int] = None
    pruner: str = "none"
    pruner_args: Any = None  # a mapping, replaced whole


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    adapter: AdapterConfig = MISSING
    prompt: PromptConfig = MISSING
    objective: ObjectiveConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    seed: int = 0
    output_dir: Optional[str] = None  # where the run writes; null: Hydra's run folder
    summary: bool = False  # print the data's statistics and the plan; train nothing
    init_from: Optional[str] = None  # a finished run (or stage) folder: start from its adapters and base
    resume: bool = False  # continue the interrupted run in hydra.run.dir from its last checkpoint
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    optuna: OptunaTrialConfig = field(default_factory=OptunaTrialConfig)
    optimized_metric: str = "best_val_loss"  # what main() returns to a sweeper


@dataclass
class GenerateConfig:
    model: ModelConfig = MISSING
    prompt: PromptConfig = MISSING
    schedule: Any = None  # composed only so that model presets which pick a training schedule compose; unused
    adapter: Any = None  # likewise
    run: Optional[str] = None  # a training run folder: its base model and adapters in one word
    adapter_path: Optional[str] = None
    checkpoint: str = "best"  # with run=: its best adapters (adapters/best, when it has them) or its last
    temperature: float = 0.0  # 0: greedy
    num_tokens: int = 256
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    min_p_tokens: int = 1
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    seed: int = 0
    eos_token: Optional[str] = None
    trust_remote_code: bool = False  # as model.trust_remote_code
    colorize: bool = False  # colour each token by its probability (always, also when piped)
    cot_source: Optional[str] = None  # a JSON chat message list: few-shot turns before the user turn
    prompt_only: bool = False  # print the exact prompt and exit, loading no weights


def register() -> None:
    node = OmegaConf.structured(Config)
    # any name goes in optimizer_args (`schedule.optimizer_args.weight_decay=0.01`, no `+`); the optimizer
    # checks the names it takes (step.check_optimizer_args)
    OmegaConf.set_struct(node.schedule.optimizer_args, False)
    ConfigStore.instance().store(name="tuning_fork_schema", node=node, replace=True)
    ConfigStore.instance().store(name="tuning_fork_generate_schema", node=GenerateConfig, replace=True)


def check(cfg) -> None:
    """Range checks that types cannot express; each error names the key and what to do."""

    def bad(key, value, want):
        raise ConfigError(f"{key}={value!r} is invalid: {want}")

    s, a, d = cfg.schedule, cfg.adapter, cfg.data
    if s.batch_size < 1:
        bad("schedule.batch_size", s.batch_size, "use a batch size of at least 1")
    if s.epochs is not None and s.epochs <= 0:
        bad("schedule.epochs", s.epochs, "use a positive number of epochs, or epochs=null to train by iters")
    if s.epochs is None and not OmegaConf.is_interpolation(s, "iters") and s.iters < 1:
        bad("schedule.iters", s.iters, "use at least 1 iteration, or set schedule.epochs")
    for key in ("eval_proportion_of_total", "reporting_interval_proportion", "validation_interval_proportion",
                "adapter_save_interval_proportion"):
        if not 0 < s[key] <= 1:
            bad(f"schedule.{key}", s[key], "use a proportion in (0, 1]")
    for key in ("evals_per_epoch", "saves_per_epoch"):
        if s[key] is not None and s[key] <= 0:
            bad(f"schedule.{key}", s[key], "use a positive number, or null")
    if s.grad_accumulation_steps < 1:
        bad("schedule.grad_accumulation_steps", s.grad_accumulation_steps, "use at least 1")
    if s.learning_rate <= 0:
        bad("schedule.learning_rate", s.learning_rate, "use a positive learning rate")
    for key in ("steps_per_eval", "steps_per_report", "save_every"):
        if OmegaConf.is_interpolation(s, key):
            continue  # derived by tf.plan: always at least 1
        if s[key] < 1:
            bad(f"schedule.{key}", s[key], "use an interval of at least 1 iteration")
    if s.loss_chunk is not None and s.loss_chunk < 1:
        bad("schedule.loss_chunk", s.loss_chunk, "use at least 1 position per chunk, or null")
    if s.keep_checkpoints is not None and s.keep_checkpoints < 1:
        bad("schedule.keep_checkpoints", s.keep_checkpoints, "keep at least 1, or null for all")
    if not OmegaConf.is_interpolation(s, "val_batches") and s.val_batches < 1 and s.val_batches != -1:
        bad("schedule.val_batches", s.val_batches, "use at least 1, or -1 for the whole validation set")
    if s.optimizer not in OPTIMIZERS:
        bad("schedule.optimizer", s.optimizer, f"choose one of {', '.join(OPTIMIZERS)}")
    if a.type not in FINE_TUNE_TYPES:
        bad("adapter.type", a.type, f"choose one of {', '.join(FINE_TUNE_TYPES)}")
    if a.type != "full" and a.rank < 1:
        bad("adapter.rank", a.rank, "use a rank of at least 1")
    if not 0.0 <= a.dropout < 1.0:
        bad("adapter.dropout", a.dropout, "use a dropout in [0, 1)")
    if a.num_layers == 0 or a.num_layers < -1:
        bad("adapter.num_layers", a.num_layers, "use -1 (all blocks) or a positive number")
    if d.source not in DATA_SOURCES:
        bad("data.source", d.source, f"choose one of {', '.join(DATA_SOURCES)}")
    if d.source in ("jsonl", "hf") and not d.path:
        bad("data.path", d.path, f"data={d.source} needs data.path=" +
            ("<folder with train.jsonl and valid.jsonl>" if d.source == "jsonl" else "<data set id>"))
    if d.too_long not in TOO_LONG:
        bad("data.too_long", d.too_long, f"choose one of {', '.join(TOO_LONG)}")
    if d.max_seq_length < 2:
        bad("data.max_seq_length", d.max_seq_length, "use at least 2 tokens")
    if cfg.prompt.format not in PROMPT_FORMATS:
        bad("prompt.format", cfg.prompt.format, f"choose one of {', '.join(PROMPT_FORMATS)}")
    q = cfg.model.quantize_bits
    if q is not None and q not in (2, 3, 4, 5, 6, 8):
        bad("model.quantize_bits", q, "use 2, 3, 4, 5, 6 or 8")
    if a.type == "full" and q is not None:
        bad("model.quantize_bits", q, "adapter=full cannot train a quantized model: use adapter=qlora, or "
            "model.quantize_bits=null")
    check_evaluation(cfg)


def check_recipe(cfg) -> None:
    """schedule=demo is the built-in model's recipe: refused for another model.path."""
    s = cfg.schedule
    if s.made_for and s.made_for != cfg.model.path:
        raise ConfigError(f"model.path={cfg.model.path} with the built-in model's recipe (schedule=demo: learning "
                          f"rate {s.learning_rate:g}) that model=tiny brought: choose a schedule "
                          "for this model, e.g. schedule=default or schedule=epochs3, or a preset such as model=mistral")


def check_evaluation(cfg) -> None:
    """Early stopping, the final validation, task metrics and what the next stage starts from."""
    from .evaluation import SCORERS

    def bad(key, value, want):
        raise ConfigError(f"{key}={value!r} is invalid: {want}")

    es, g = cfg.schedule.early_stopping, cfg.eval.generate
    if es.patience is not None and es.patience < 1:
        bad("schedule.early_stopping.patience", es.patience, "use at least 1 validation, or null (never stop early)")
    if es.min_delta < 0:
        bad("schedule.early_stopping.min_delta", es.min_delta, "use 0 or a positive number")
    if es.mode not in ("auto", "min", "max"):
        bad("schedule.early_stopping.mode", es.mode, "choose auto, min or max")
    if cfg.schedule.final_validation not in ("full", "sample"):
        bad("schedule.final_validation", cfg.schedule.final_validation, "choose full or sample")
    if g.records < 0 or g.max_tokens < 1:
        bad("eval.generate.records" if g.records < 0 else "eval.generate.max_tokens",
            g.records if g.records < 0 else g.max_tokens, "use records >= 0 (0: off) and max_tokens >= 1")
    if unknown := [m for m in g.metrics if m not in SCORERS]:
        bad("eval.generate.metrics", unknown, f"choose from {', '.join(SCORERS)}")
    monitored = ["val_loss"] + ([f"val_{m}" for m in g.metrics] if g.records else [])
    if es.metric not in monitored:
        bad("schedule.early_stopping.metric", es.metric, f"choose one the run logs: {', '.join(monitored)}"
            + ("" if g.records else " (task metrics need eval.generate.records > 0)"))
    if cfg.pipeline.carry not in ("best", "last"):
        bad("pipeline.carry", cfg.pipeline.carry, "choose best or last")


def result_metrics(cfg, has_test: bool) -> list[str]:
    """The names train() returns, which optimized_metric may name."""
    names = ["best_val_loss", "val_loss", "first_val_loss", "train_loss", "best_iteration"]
    if cfg.schedule.final_validation == "full":
        names.append("val_loss_full")
    if cfg.eval.generate.records:
        for m in cfg.eval.generate.metrics:
            names += [f"val_{m}", f"best_val_{m}"]
    if has_test:
        names += ["test_loss", "test_ppl"]
    return names


def check_optimized_metric(cfg, has_test: bool, metric: str | None = None) -> None:
    """optimized_metric (or `metric`) must be a name the run returns; refused before anything trains."""
    metric = metric or cfg.optimized_metric
    names = result_metrics(cfg, has_test)
    if metric not in names:
        from .evaluation import SCORERS

        hint = " (test_loss needs a test split: test.jsonl, or data.test_split)" if "test" in metric else ""
        if metric.removeprefix("best_").removeprefix("val_") in SCORERS:
            hint = " (task metrics need eval.generate.records > 0)"
        raise ConfigError(f"optimized_metric={metric!r}: this run does not log it{hint}; choose one "
                          f"of {', '.join(names)}")
