"""Typed schemas for every config group, registered in Hydra's ConfigStore.

`conf/config.yaml` puts `tuning_fork_schema` first in its defaults list, so every option of every group is
merged into these dataclasses: a misspelled key or a value of the wrong type fails at composition, before
any model loads. Range checks Hydra cannot express live in `check()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .errors import ConfigError

class Choice(str, Enum):
    """A fixed choice: a typo fails at composition, listing the choices; a member equals its name as a str."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec) -> str:
        return format(self.value, spec)


def choice(name: str, *values: str):
    return Choice(name, [(v, v) for v in values])


Optimizer = choice("Optimizer", "adam", "adamw", "sgd", "adafactor", "muon")
AdapterType = choice("AdapterType", "lora", "dora", "full", "qlora")
DataSource = choice("DataSource", "demo", "jsonl", "hf", "mix")
SourceKind = choice("SourceKind", "demo", "jsonl", "hf")
TooLong = choice("TooLong", "truncate", "drop", "error")
PromptFormat = choice("PromptFormat", "tokenizer", "chatml", "llama3", "mistral", "alpaca", "phi", "gemma")
Objective = choice("Objective", "sft", "dpo", "orpo", "simpo", "grpo")
LossType = choice("LossType", "sigmoid", "ipo", "hinge", "grpo", "dr_grpo", "dapo")
ScaleRewards = choice("ScaleRewards", "group", "batch", "none")
Direction = choice("Direction", "auto", "min", "max")
FinalValidation = choice("FinalValidation", "full", "sample")
Carry = choice("Carry", "best", "last")
TaskMetric = choice("TaskMetric", "exact_match", "token_f1", "rouge_l")
TrainOn = choice("TrainOn", "all_assistant", "last_assistant")
Reasoning = choice("Reasoning", "keep", "drop")
MaskMismatch = choice("MaskMismatch", "error", "skip")
Decay = choice("Decay", "cosine", "linear", "constant")
StageApp = choice("StageApp", "train", "export", "evaluate")
CheckpointPart = choice("CheckpointPart", "block", "attention", "mlp")


@dataclass
class ModelConfig:
    path: str = "tiny"  # a Hugging Face id, a local folder, or `tiny` (built in)
    trust_remote_code: bool = False
    revision: Optional[str] = None
    # QLoRA: quantize an unquantized base before fitting adapters. adapter=qlora uses 4 bits when unset.
    quantize_bits: Optional[int] = None
    quantize_group_size: int = 64


@dataclass
class SourceConfig:
    """One source of a mixture (data=mix): where its records are, its share of each epoch, and the data
    settings it changes (null: the data group's)."""

    source: SourceKind = SourceKind.jsonl
    path: Optional[str] = None  # jsonl: a folder (valid.jsonl optional); hf: a data set id; demo: a subfolder
    weight: Optional[float] = None  # a share of each epoch's records, with the other weighted sources
    epochs: Optional[float] = None  # or whole passes over it per epoch (neither: epochs=1)
    hf_config: Optional[str] = None
    train_split: str = "train"
    valid_split: Optional[str] = None  # hf: a validation split, if it has one
    test_split: Optional[str] = None
    text_feature: Optional[str] = None
    prompt_feature: Optional[str] = None
    completion_feature: Optional[str] = None
    chat_feature: Optional[str] = None
    chosen_feature: Optional[str] = None
    rejected_feature: Optional[str] = None
    system_feature: Optional[str] = None
    mask_prompt: Optional[bool] = None
    train_on: Optional[TrainOn] = None
    reasoning: Optional[Reasoning] = None
    prompt_format: Optional[PromptFormat] = None  # its prompt format (prompt.format otherwise)
    system: Optional[str] = None  # its system prompt (prompt.system otherwise)


@dataclass
class DataConfig:
    source: DataSource = DataSource.demo
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
    chosen_feature: str = "chosen"  # preference pairs (objective=dpo|orpo|simpo)
    rejected_feature: str = "rejected"
    system_feature: str = "system"
    mask_prompt: bool = False  # completion-only loss: train on the assistant turns alone (chat.py)
    train_on: TrainOn = TrainOn.all_assistant  # with mask_prompt: every assistant turn, or the last one alone
    reasoning: Reasoning = Reasoning.keep  # an assistant turn's <think> reasoning: a target (keep), or left out
    mask_mismatch: MaskMismatch = MaskMismatch.error  # a record the chat template breaks: refuse it, or skip it
    cache: bool = True  # tokenized splits kept under the tuning_fork cache, reused by reruns and sweep trials
    max_seq_length: int = 2048
    too_long: TooLong = TooLong.truncate  # records over max_seq_length tokens: truncate | drop | error
    packing: bool = False  # several records per row (up to max_seq_length), attention kept within each record
    # data=mix: named sources mixed in chosen proportions (data.sources.NAME.path=..., .weight=... or .epochs=...)
    sources: Dict[str, Any] = field(default_factory=dict)  # each a SourceConfig (checked in mixture.sources)
    records_per_epoch: Optional[int] = None  # the mixture's epoch (null: what its sources' epochs and sizes make)


def derived(key: str):
    """The default of a derived schedule key: computed from epochs and the data's size (schedule.py)."""
    return field(default="${tf.plan:%s}" % key)


@dataclass
class LRScheduleConfig:
    # after the warmup, the rate decays from its peak to min_lr over the rest of the run (mlx-tuning-fork's
    # dynamic_learning): cosine | linear | constant; or name: any mlx.optimizers.schedulers function
    decay: Optional[Decay] = None
    min_lr: Optional[float] = None  # where the decay ends (default 0); or min_lr_ratio: a share of the peak
    min_lr_ratio: Optional[float] = None
    name: Optional[str] = None  # e.g. cosine_decay, with its positional arguments after the peak rate:
    arguments: List[Any] = field(default_factory=list)
    warmup_proportion: Optional[float] = None  # linear warmup over this share of the optimizer updates
    warmup: int = derived("warmup")  # linear warmup, in optimizer updates (set it to override the proportion)
    warmup_init: float = 0.0


@dataclass
class EarlyStoppingConfig:
    patience: Optional[int] = None  # validations without an improvement before the run ends; null: never
    min_delta: float = 0.0  # an improvement must be larger than this to count
    metric: str = "val_loss"  # the monitored metric (also picks the best adapter): val_loss or val_<task metric>
    mode: Direction = Direction.auto  # auto (task metrics up, losses down) | min | max


@dataclass
class ScheduleConfig:
    batch_size: int = 4  # global: split across data-parallel ranks
    learning_rate: float = 1e-5
    optimizer: Optimizer = Optimizer.adam
    optimizer_args: Dict[str, Any] = field(default_factory=dict)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    grad_accumulation_steps: int = 1
    grad_checkpoint: bool = False  # recompute activations in the backward pass: less memory, slower steps
    checkpoint_part: CheckpointPart = CheckpointPart.block  # with grad_checkpoint: what is recomputed: the whole
    #                                 block, or only its attention or its MLP (less saved, less slowed)
    checkpoint_layers: Optional[int] = None  # with grad_checkpoint: the first N blocks only; null: all of them
    lean_layers: bool = True  # LoRA branches in the model's precision and SwiGLU MLPs with their own VJP: the same
    #                           losses and gradients, fewer saved activations (tuning_fork/layers.py, BENCHMARKS.md)
    loss_chunk: Optional[int] = None  # logits this many positions at a time (big vocabularies); null: all at once
    reduce_bucket_mb: float = 0.0  # several ranks: > 0 averages gradients in buckets of this size, last layer first,
    #                                on a GPU stream of their own (beside the backward pass); 0: one all-reduce
    #                                and one optimizer update over all of them (step.flat_update)
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
    final_validation: FinalValidation = FinalValidation.full  # full: the last validation also scores the whole split | sample
    made_for: Optional[str] = None  # the model.path this schedule is a recipe for (schedule=demo: tiny)


@dataclass
class AdapterConfig:
    type: AdapterType = AdapterType.lora
    rank: int = 8
    alpha: float = 16.0  # PEFT-style; mlx-lm's scale = alpha / rank
    scale: Optional[float] = None  # mlx-lm's scale directly; wins over alpha when set
    dropout: float = 0.0
    keys: Optional[List[str]] = None  # module paths inside each block, e.g. [self_attn.q_proj]; null: all linears
    num_layers: int = -1  # blocks from the top to adapt; -1 (or more than the model has): all


@dataclass
class PromptConfig:
    format: PromptFormat = PromptFormat.tokenizer
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
    metrics: List[TaskMetric] = field(default_factory=lambda: list(TaskMetric))


@dataclass
class EvalConfig:
    generate: GenerateEvalConfig = field(default_factory=GenerateEvalConfig)
    # benchmark tasks through lm-evaluation-harness (tuning_fork.evaluate; in training: after the final validation)
    tasks: List[str] = field(default_factory=list)  # harness task names (or the names of YAML tasks in include_path)
    include_path: Optional[str] = None  # a folder of the harness's YAML task files
    num_fewshot: Optional[int] = None  # null: each task's own
    limit: Optional[float] = None  # records per task (or a fraction of them); null: all
    batch_size: int = 8
    max_tokens: Optional[int] = None  # generation tasks' answer length; null: the harness's
    apply_chat_template: Optional[bool] = None  # null: when the tokenizer has one
    baseline: bool = True  # tuning_fork.evaluate: score the base model too (before/after)


@dataclass
class ObjectiveConfig:
    name: Objective = Objective.sft  # sft: next-token loss on the targets of each record; dpo | orpo | simpo: pairs
    beta: float = 0.1  # dpo: the KL weight β; orpo: λ; simpo: β (its group file sets 2.0)
    loss_type: LossType = LossType.sigmoid  # dpo: sigmoid | ipo | hinge
    label_smoothing: float = 0.0  # dpo (sigmoid), simpo: the probability ε that a pair's labels are flipped
    gamma_beta_ratio: float = 0.5  # simpo: γ/β, the target reward margin over β
    # grpo (objectives/grpo.py): rewards, and how completions are sampled and reused
    rewards: List[Any] = field(default_factory=list)  # [{_target_: module.function, weight: 1.0, ...}, ...]
    group_size: int = 4  # completions sampled per prompt
    max_tokens: int = 64  # the longest completion
    temperature: float = 1.0
    top_p: float = 1.0
    epsilon: float = 0.2  # the policy ratio's clip range: [1 - epsilon, 1 + epsilon_high]
    epsilon_high: Optional[float] = None  # null: epsilon (DAPO uses 0.28)
    # the advantage's divisor, as TRL's scale_rewards: group (each group's std) | batch (the batch's std) | none;
    # null: none for dr_grpo (Liu et al. 2025 drop it), group otherwise
    scale_rewards: Optional[ScaleRewards] = None
    iterations_per_batch: int = 1  # μ: optimizer iterations on each batch of completions
    log_samples: int = 8  # completions written to RUN/samples/ at each validation


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
    app: StageApp = StageApp.train  # export | evaluate: that app on the stage before (run=), with these overrides


@dataclass
class PipelineConfig:
    stages: List[StageConfig] = field(default_factory=list)  # empty: a single run, no pipeline
    only: Optional[str] = None  # run this stage alone (chained from an earlier stage's folder if present)
    carry: Carry = Carry.best  # what the next stage starts from: the stage's best adapters, or its last


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
    data: DataConfig = field(default_factory=DataConfig)
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
    checkpoint: Carry = Carry.best  # with run=: its best adapters (adapters/best, when it has them) or its last
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


ExportFormat = choice("ExportFormat", "mlx", "hf", "gguf")


@dataclass
class QuantizeConfig:
    bits: Optional[int] = None  # format=mlx: 4 or 8 (also 2, 3, 5, 6) quantizes the fused model; null: as the base
    group_size: int = 64


@dataclass
class PushConfig:
    repo: Optional[str] = None  # ORG/NAME: upload the export to the Hugging Face hub (one commit)
    private: bool = True


@dataclass
class UseConfig:
    """What the apps that use a finished run share (export, serve, evaluate): the run, which adapters."""

    model: ModelConfig = MISSING
    prompt: PromptConfig = MISSING
    schedule: Any = None  # composed only so that model presets compose; unused
    adapter: Any = None
    run: Optional[str] = None  # a training run folder
    adapter_path: Optional[str] = None
    checkpoint: Carry = Carry.best
    trust_remote_code: bool = False
    eos_token: Optional[str] = None


@dataclass
class ServeConfig(UseConfig):
    host: str = "127.0.0.1"  # loopback: reachable from this machine only; 0.0.0.0 to serve a network
    port: int = 8080
    temperature: float = 0.0  # the server's defaults; a request may set its own
    max_tokens: int = 512
    log_level: str = "INFO"


@dataclass
class EvaluateConfig(UseConfig):
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0


@dataclass
class ExportConfig(UseConfig):
    format: ExportFormat = ExportFormat.mlx
    out: Optional[str] = None  # null: RUN/export/<format>
    overwrite: bool = False  # replace an existing export folder (otherwise refused)
    dtype: Optional[str] = None  # float16 | bfloat16 | float32 for the weights written; null: the model's
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    push: PushConfig = field(default_factory=PushConfig)


def register() -> None:
    node = OmegaConf.structured(Config)
    # any name goes in optimizer_args (`schedule.optimizer_args.weight_decay=0.01`, no `+`); the optimizer
    # checks the names it takes (step.check_optimizer_args)
    OmegaConf.set_struct(node.schedule.optimizer_args, False)
    # a mixture's sources are named by the user: `data.sources.chat.path=...` adds one, no `+` needed
    OmegaConf.set_struct(node.data.sources, False)
    ConfigStore.instance().store(name="tuning_fork_schema", node=node, replace=True)
    ConfigStore.instance().store(name="tuning_fork_generate_schema", node=GenerateConfig, replace=True)
    ConfigStore.instance().store(name="tuning_fork_export_schema", node=ExportConfig, replace=True)
    ConfigStore.instance().store(name="tuning_fork_evaluate_schema", node=EvaluateConfig, replace=True)
    ConfigStore.instance().store(name="tuning_fork_serve_schema", node=ServeConfig, replace=True)


# Range checks that types cannot express: (key, test on a set value, what to do). A value that is null, or
# still derived by tf.plan (an interpolation), is not tested.
RANGES = [
    ("schedule.iters", lambda v: v >= 1, "use at least 1 iteration, or set schedule.epochs"),
    *[(f"schedule.{k}", lambda v: 0 < v <= 1, "use a proportion in (0, 1]")
      for k in ("eval_proportion_of_total", "reporting_interval_proportion", "validation_interval_proportion",
                "adapter_save_interval_proportion")],
    *[(f"schedule.{k}", lambda v: v > 0, "use a positive number, or null") for k in ("evals_per_epoch", "saves_per_epoch")],
    ("schedule.grad_accumulation_steps", lambda v: v >= 1, "use at least 1"),
    ("schedule.learning_rate", lambda v: v > 0, "use a positive learning rate"),
    *[(f"schedule.{k}", lambda v: v >= 1, "use an interval of at least 1 iteration")
      for k in ("steps_per_eval", "steps_per_report", "save_every")],
    ("schedule.loss_chunk", lambda v: v >= 1, "use at least 1 position per chunk, or null"),
    ("schedule.keep_checkpoints", lambda v: v >= 1, "keep at least 1, or null for all"),
    ("schedule.val_batches", lambda v: v >= 1 or v == -1, "use at least 1, or -1 for the whole validation set"),
    ("schedule.early_stopping.patience", lambda v: v >= 1, "use at least 1 validation, or null (never stop early)"),
    ("schedule.early_stopping.min_delta", lambda v: v >= 0, "use 0 or a positive number"),
    ("adapter.dropout", lambda v: 0.0 <= v < 1.0, "use a dropout in [0, 1)"),
    ("adapter.num_layers", lambda v: v == -1 or v >= 1, "use -1 (all blocks) or a positive number"),
    ("data.max_seq_length", lambda v: v >= 2, "use at least 2 tokens"),
    ("model.quantize_bits", lambda v: v in (2, 3, 4, 5, 6, 8), "use 2, 3, 4, 5, 6 or 8"),
    ("eval.generate.records", lambda v: v >= 0, "use 0 (off) or more records"),
    ("objective.beta", lambda v: v > 0, "use a positive beta"),
    ("objective.label_smoothing", lambda v: 0 <= v < 0.5, "use a label smoothing in [0, 0.5)"),
    ("eval.generate.max_tokens", lambda v: v >= 1, "use at least 1 token"),
    ("schedule.lr_schedule.min_lr", lambda v: v >= 0, "use 0 or a positive learning rate"),
    ("schedule.lr_schedule.min_lr_ratio", lambda v: 0 <= v <= 1, "use a share of the peak rate in [0, 1]"),
    ("schedule.reduce_bucket_mb", lambda v: v >= 0, "use 0 (one all-reduce over all gradients) or a bucket size in MB"),
    ("schedule.checkpoint_layers", lambda v: v >= 1, "use at least 1 block, or null for all of them"),
]


def check(cfg) -> None:
    """Range checks that types cannot express, and settings that do not go together; each error names the
    key and what to do."""
    from .schedule import check_inputs

    check_inputs(cfg.schedule.batch_size, cfg.schedule.epochs)
    for key, ok, want in RANGES:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent)
        if node is None or OmegaConf.is_interpolation(node, leaf) or node[leaf] is None:
            continue
        if not ok(node[leaf]):
            raise ConfigError(f"{key}={node[leaf]!r} is invalid: {want}")
    a, d = cfg.adapter, cfg.data
    if a.type != "full" and a.rank < 1:
        raise ConfigError(f"adapter.rank={a.rank!r} is invalid: use a rank of at least 1")
    if d.source in ("jsonl", "hf") and not d.path:
        raise ConfigError(f"data.path=None is invalid: data={d.source} needs data.path=" +
                          ("<folder with train.jsonl and valid.jsonl>" if d.source == "jsonl" else "<data set id>"))
    if d.source == "mix":
        from .mixture import check as check_mixture

        check_mixture(d)
    if a.type == "full" and cfg.model.quantize_bits is not None:
        raise ConfigError(f"model.quantize_bits={cfg.model.quantize_bits!r} is invalid: adapter=full cannot train a "
                          "quantized model: use adapter=qlora, or model.quantize_bits=null")
    check_lr_schedule(cfg.schedule.lr_schedule)
    check_checkpointing(cfg.schedule)
    check_evaluation(cfg)


def check_checkpointing(s) -> None:
    """checkpoint_part and checkpoint_layers say what grad_checkpoint recomputes: without it they would do nothing."""
    for key, default in (("checkpoint_part", "block"), ("checkpoint_layers", None)):
        value = s.get(key, default)
        if not s.grad_checkpoint and value != default:
            raise ConfigError(f"schedule.{key}={value} has no effect without schedule.grad_checkpoint=true: set it too")


def check_lr_schedule(sc) -> None:
    """decay (ours) and name (mlx's scheduler) are two ways to say one thing; min_lr and min_lr_ratio too;
    a floor needs a decay to reach it."""
    if sc.decay and sc.name:
        raise ConfigError(f"schedule.lr_schedule: decay={sc.decay} and name={sc.name} both set: choose one")
    if sc.min_lr is not None and sc.min_lr_ratio is not None:
        raise ConfigError("schedule.lr_schedule: min_lr and min_lr_ratio both set: choose one")
    if (sc.min_lr is not None or sc.min_lr_ratio is not None) and not sc.decay:
        raise ConfigError("schedule.lr_schedule.min_lr (or min_lr_ratio) without a decay has no effect: set "
                          "schedule.lr_schedule.decay=cosine or linear")


def check_recipe(cfg) -> None:
    """schedule=demo is the built-in model's recipe: refused for another model.path."""
    s = cfg.schedule
    if s.made_for and s.made_for != cfg.model.path:
        raise ConfigError(f"model.path={cfg.model.path} with schedule=demo, the built-in model's recipe (learning "
                          f"rate {s.learning_rate:g} for random weights): leave schedule out (schedule=auto), or "
                          "choose schedule=default or schedule=epochs3")


def check_evaluation(cfg) -> None:
    """Early stopping, the final validation, task metrics and what the next stage starts from."""
    def bad(key, value, want):
        raise ConfigError(f"{key}={value!r} is invalid: {want}")

    es, g = cfg.schedule.early_stopping, cfg.eval.generate
    monitored = ["val_loss"] + source_losses(cfg) + [f"val_{m}" for m in objective_metrics(cfg)]
    if es.metric not in monitored:
        bad("schedule.early_stopping.metric", es.metric, f"choose one the run logs: {', '.join(monitored)}"
            + ("" if g.records else " (task metrics need eval.generate.records > 0)"))


def objective_metrics(cfg) -> list[str]:
    """The metrics each validation logs besides val_loss (without the val_ prefix)."""
    from .evaluation import PREFERENCE_METRICS

    names = [str(m) for m in cfg.eval.generate.metrics] if cfg.eval.generate.records else []
    if cfg.objective.name == "grpo":
        from .evaluation import GRPO_METRICS

        return names + list(GRPO_METRICS) + [f"reward/{r.get('name') or str(r.get('_target_', '')).rsplit('.', 1)[-1]}"
                                             for r in cfg.objective.rewards]
    return names + (list(PREFERENCE_METRICS) if cfg.objective.name != "sft" else [])


def source_losses(cfg) -> list[str]:
    """A mixture's validation losses per source (data=mix): val_loss/NAME."""
    return [f"val_loss/{name}" for name in cfg.data.sources] if cfg.data.source == "mix" else []


def result_metrics(cfg, has_test: bool) -> list[str]:
    """The names train() returns, which optimized_metric may name."""
    names = ["best_val_loss", "val_loss", "first_val_loss", "train_loss", "best_iteration"]
    for name in source_losses(cfg):
        names += [name, f"best_{name}"]
    if cfg.schedule.final_validation == "full":
        names.append("val_loss_full")
    for m in objective_metrics(cfg):
        names += [f"val_{m}", f"best_val_{m}"]
    if has_test:
        names += ["test_loss", "test_ppl"]
    if cfg.eval.tasks:  # the harness's metrics are known once it has run: eval/<task>/<metric>
        names += [f"eval/{t}/..." for t in cfg.eval.tasks]
    return names


def check_optimized_metric(cfg, has_test: bool, metric: str | None = None) -> None:
    """optimized_metric (or `metric`) must be a name the run returns; refused before anything trains."""
    metric = metric or cfg.optimized_metric
    names = result_metrics(cfg, has_test)
    if any(metric.startswith(f"eval/{t}/") for t in cfg.eval.tasks):
        return
    if metric not in names:
        from .evaluation import SCORERS

        hint = " (test_loss needs a test split: test.jsonl, or data.test_split)" if "test" in metric else ""
        if metric.removeprefix("best_").removeprefix("val_") in SCORERS:
            hint = " (task metrics need eval.generate.records > 0)"
        raise ConfigError(f"optimized_metric={metric!r}: this run does not log it{hint}; choose one "
                          f"of {', '.join(names)}")
