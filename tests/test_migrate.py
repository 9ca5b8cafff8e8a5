"""mlx-lm's example LoRA config, each of its optional blocks switched on in turn, and mlx-tuning-fork's keys:
each migrates to a pipeline whose stage composes, resolves and trains on the tiny model."""

import copy
import json
import math

import pytest
import yaml

from tuning_fork import migrate
from tuning_fork.pipeline import _merge

from .conftest import compose_cfg, make_data

# The keys and values of mlx-lm's mlx_lm/examples/lora_config.yaml (its optional blocks below, as VARIANTS)
EXAMPLE = """
model: "mlx_model"
train: true
fine_tune_type: lora
training_mode: normal
optimizer: adamw
data: "/path/to/training/data"
seed: 0
num_layers: 16
batch_size: 4
iters: 1000
val_batches: 25
learning_rate: 1e-5
steps_per_report: 10
steps_per_eval: 200
resume_adapter_file: null
adapter_path: "adapters"
save_every: 100
test: false
test_batches: 100
max_seq_length: 2048
grad_checkpoint: false
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 8
  scale: 20.0
  dropout: 0.0
"""

VARIANTS = {
    "example": {},
    "adamw_args": {"optimizer_config": {"adamw": {"betas": [0.9, 0.98], "eps": "1e-6", "weight_decay": 0.05,
                                                  "bias_correction": True}}},
    "sgd": {"optimizer": "sgd", "optimizer_config": {"sgd": {"momentum": 0.9, "weight_decay": 0.01,
                                                             "nesterov": True}}},
    "adafactor": {"optimizer": "adafactor", "optimizer_config": {"adafactor": {
        "eps": [1e-30, 1e-3], "clip_threshold": 1.0, "decay_rate": -0.8, "relative_step": False,
        "scale_parameter": False}}},
    "muon": {"optimizer": "muon", "optimizer_config": {"muon": {"momentum": 0.95, "nesterov": True, "ns_steps": 5}}},
    "lr_schedule": {"lr_schedule": {"name": "cosine_decay", "warmup": 1, "warmup_init": "1e-7",
                                    "arguments": ["1e-5", 1000, "1e-7"]}},
    "hf_dataset": {"hf_dataset": {"path": "HF", "train_split": "train[:75%]", "valid_split": "validation[:4]",
                                  "prompt_feature": "prompt", "completion_feature": "completion"}},
    "grad_checkpoint": {"grad_checkpoint": True},
    "test": {"test": True, "test_batches": 1},
    "dropout_and_keys": {"lora_parameters": {"keys": ["mlp.down_proj"], "rank": 4, "scale": 10.0, "dropout": 0.1}},
    "dora": {"fine_tune_type": "dora"},
    "full": {"fine_tune_type": "full"},
    "quantized": {"model": "QUANTIZED"},
    "mlx_tuning_fork": {"epochs": 1, "evals_per_epoch": 2, "saves_per_epoch": 1, "eval_proportion_of_total": 0.5,
                        "reporting_interval_proportion": 0.1, "prompt_format": "chatml", "iters": None},
}

SHORT = ["schedule.iters=2", "schedule.steps_per_eval=2", "schedule.steps_per_report=1", "schedule.save_every=2",
         "schedule.val_batches=1", "schedule.batch_size=4", "schedule.epochs=null"]


def old_config(name, **more):
    old = yaml.load(EXAMPLE, Loader=migrate.Loader)
    for key, v in copy.deepcopy({**VARIANTS[name], **more}).items():
        if v is None:
            old.pop(key, None)
        else:
            old[key] = v
    text = yaml.safe_dump(old)
    return text.replace("'1e-6'", "1e-6").replace("'1e-7'", "1e-7").replace("'1e-5'", "1e-5")  # as users write them


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Data in three forms, and the built-in model quantized to 4 bits."""
    root = tmp_path_factory.mktemp("migrate")
    from mlx_lm import convert

    from tuning_fork.models import resolve

    quantized = root / "tiny-4bit"
    convert(resolve("tiny"), mlx_path=str(quantized), quantize=True, q_group_size=64, q_bits=4)
    return {"chat": make_data(root / "chat", n_test=4), "completions": make_data(root / "qa", fmt="completions"),
            "quantized": quantized, "root": root}


def migrate_and_train(tmp_path, places, name, capsys, **more):
    text = old_config(name, **more).replace("HF", str(places["completions"]))
    text = text.replace("QUANTIZED", str(places["quantized"]))
    (tmp_path / f"{name}.yaml").write_text(text)
    assert migrate.main([str(tmp_path / f"{name}.yaml"), "--conf-dir", str(tmp_path / "conf")]) == 0
    said = capsys.readouterr()
    (stage,) = yaml.safe_load((tmp_path / "conf" / "pipeline" / f"{name}.yaml").read_text())["stages"]
    mine = [f"data.path={places['chat']}"] if "hf_dataset" not in text else []
    if "QUANTIZED" not in old_config(name, **more):
        mine.append("model.path=tiny")
    cfg = compose_cfg(*_merge(stage["overrides"], [*mine, *SHORT, f"output_dir={tmp_path / 'run'}"]))
    from omegaconf import OmegaConf

    from tuning_fork.train import train

    resolved = OmegaConf.to_container(cfg, resolve=True)  # what --cfg job --resolve prints
    result = train(cfg)
    assert math.isfinite(result["val_loss"]) and (tmp_path / "run" / "adapters" / "adapters.safetensors").exists()
    return stage["overrides"], resolved, result, said


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_of_mlx_lms_example_migrates_and_trains(tmp_path, places, name, capsys):
    overrides, resolved, result, said = migrate_and_train(tmp_path, places, name, capsys)
    s, a, d = resolved["schedule"], resolved["adapter"], resolved["data"]
    for key in ("train", "adapter_path", "test"):
        assert f"{key}:" in said.err  # reported, never silently dropped
    if name == "adamw_args":
        assert s["optimizer"] == "adamw" and s["optimizer_args"] == {
            "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.05, "bias_correction": True}
    if name in ("sgd", "adafactor", "muon"):
        assert s["optimizer"] == name and s["optimizer_args"] == VARIANTS[name]["optimizer_config"][name]
    if name == "lr_schedule":
        assert {k: v for k, v in s["lr_schedule"].items() if v is not None} == {
            "name": "cosine_decay", "arguments": [1000, 1e-7], "warmup": 1, "warmup_init": 1e-7}
        assert s["learning_rate"] == 1e-5
    if name == "hf_dataset":
        assert d["source"] == "hf" and d["train_split"] == "train[:75%]" and d["prompt_feature"] == "prompt"
    if name == "grad_checkpoint":
        assert s["grad_checkpoint"] is True
    if name == "test":
        assert s["test_batches"] == 1 and "test_loss" in result
    if name == "dropout_and_keys":
        assert a["keys"] == ["mlp.down_proj"] and a["rank"] == 4 and a["dropout"] == 0.1
    if name in ("dora", "full"):
        assert a["type"] == name
    if name == "quantized":
        config = json.loads((tmp_path / "run" / "adapters" / "adapter_config.json").read_text())
        assert config["model"] == str(places["quantized"]) and a["type"] == "lora"
    if name == "mlx_tuning_fork":
        assert {"schedule.epochs=1", "schedule.evals_per_epoch=2", "schedule.saves_per_epoch=1", "prompt=chatml",
                "schedule.eval_proportion_of_total=0.5"} <= set(overrides)
        assert s["evals_per_epoch"] == 2 and resolved["prompt"]["format"] == "chatml"
    if name == "example":
        assert a == {**a, "keys": ["self_attn.q_proj", "self_attn.v_proj"], "rank": 8, "scale": 20.0}
        assert s["optimizer"] == "adamw" and d["max_seq_length"] == 2048 and resolved["seed"] == 0


@pytest.mark.slow
def test_resume_adapter_file_becomes_init_from(tmp_path, places, capsys):
    first = tmp_path / "first"
    first.mkdir()
    migrate_and_train(first, places, "example", capsys)
    adapters = first / "run" / "adapters" / "adapters.safetensors"
    overrides, resolved, _, said = migrate_and_train(tmp_path, places, "example", capsys,
                                                     resume_adapter_file=str(adapters))
    assert f"init_from={adapters.parent}" in overrides and resolved["init_from"] == str(adapters.parent)
    assert "resume_adapter_file" in said.err


def test_keys_without_an_equivalent_are_reported_and_kept_as_comments(tmp_path, capsys):
    (tmp_path / "grpo.yaml").write_text(old_config("example", training_mode="grpo", group_size=4, beta=0.1))
    assert migrate.main([str(tmp_path / "grpo.yaml"), "--conf-dir", str(tmp_path / "conf")]) == 0
    err = capsys.readouterr().err
    written = (tmp_path / "conf" / "pipeline" / "grpo.yaml").read_text()
    for key in ("training_mode", "group_size", "beta"):
        assert key in err and f"NOT MIGRATED: {tmp_path / 'grpo.yaml'}: {key}" in written


def test_an_override_that_does_not_compose_is_reported_not_written(tmp_path, capsys):
    kept, refused = migrate.composable(["schedule.batch_size=4", "schedule.nonsense=1"], "x.yaml")
    assert kept == ["schedule.batch_size=4"] and refused[0].startswith("x.yaml: schedule.nonsense=1 (")


def test_optimizer_arguments_are_set_as_users_write_them_and_checked():
    from tuning_fork.errors import ConfigError
    from tuning_fork.step import build_optimizer

    cfg = compose_cfg("schedule.optimizer=adamw", "schedule.optimizer_args.weight_decay=0.01",
                      "schedule.optimizer_args={betas:[0.9,0.98],eps:1e-6}")
    assert dict(cfg.schedule.optimizer_args) == {"weight_decay": 0.01, "betas": [0.9, 0.98], "eps": 1e-6}  # merged
    cfg = compose_cfg("schedule.optimizer=adamw", "schedule.optimizer_args.weight_decay=0.01")
    optimizer = build_optimizer(cfg.schedule, updates=10)
    assert optimizer.weight_decay == 0.01
    cfg = compose_cfg("schedule.optimizer=sgd", "schedule.optimizer_args.betas=[0.9,0.99]")
    with pytest.raises(ConfigError, match="sgd optimizer does not take it; it takes momentum, weight_decay"):
        build_optimizer(cfg.schedule, updates=10)
