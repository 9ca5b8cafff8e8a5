"""Real training runs on the built-in model: the demo learns, artefacts load in mlx-lm, every adapter type."""

import json
import math
import subprocess
import sys

import pytest

from .conftest import ROOT, compose_cfg, make_data, read_metrics, run_cli

pytestmark = pytest.mark.slow


def train_in_process(tmp_path, *overrides, data=None):
    from tuning_fork.train import train

    folder = data or make_data(tmp_path / "data", n_test=4)
    cfg = compose_cfg("data=jsonl", f"data.path={folder}", f"output_dir={tmp_path / 'run'}", "debug=fast",
                      "schedule.iters=12", *overrides)
    return train(cfg), tmp_path / "run"


def greedy(model, tokenizer, messages, max_tokens=24):
    from mlx_lm import generate

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return generate(model, tokenizer, prompt, max_tokens=max_tokens, verbose=False)


def test_the_bare_demo_learns(demo_run):
    run_dir, proc = demo_run
    metrics = read_metrics(run_dir)
    vals = [m for m in metrics if "val_loss" in m]
    trains = [m for m in metrics if "train_loss" in m]
    assert vals[0]["iteration"] == 0 and vals[-1]["iteration"] == trains[-1]["iteration"]
    assert vals[-1]["val_loss"] <= vals[0]["val_loss"] / 2, (vals[0], vals[-1])
    for m in trains:
        assert {"iteration", "train_loss", "learning_rate", "tokens_per_second", "trained_tokens",
                "peak_memory"} <= set(m)
    assert any("test_loss" in m and "test_ppl" in m for m in metrics)
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert "val" in proc.stdout and "train" in proc.stdout  # the progress display


def test_demo_adapters_load_in_mlx_lm_and_answer_trained_questions(demo_run):
    from mlx_lm import load

    run_dir, _ = demo_run
    adapter_cfg = json.loads((run_dir / "adapters" / "adapter_config.json").read_text())
    assert adapter_cfg["fine_tune_type"] == "lora"
    model, tokenizer = load(adapter_cfg["model"], adapter_path=str(run_dir / "adapters"))
    from tuning_fork.data import demo_dir

    records = [json.loads(x) for x in (demo_dir() / "train.jsonl").read_text().splitlines()][:6]
    right = sum(greedy(model, tokenizer, r["messages"][:-1]).strip() == r["messages"][-1]["content"]
                for r in records)
    assert right >= 4, right


def test_demo_adapters_fuse_with_mlx_lm(demo_run, tmp_path):
    run_dir, _ = demo_run
    adapter_cfg = json.loads((run_dir / "adapters" / "adapter_config.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "fuse", "--model", adapter_cfg["model"],
                           "--adapter-path", str(run_dir / "adapters"), "--save-path", str(tmp_path / "fused")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from mlx_lm import load

    model, tokenizer = load(str(tmp_path / "fused"))
    from tuning_fork.data import demo_dir

    rec = json.loads((demo_dir() / "train.jsonl").read_text().splitlines()[0])
    fused = greedy(model, tokenizer, rec["messages"][:-1])
    adapted, tok2 = load(adapter_cfg["model"], adapter_path=str(run_dir / "adapters"))
    assert fused == greedy(adapted, tok2, rec["messages"][:-1])


def test_same_seed_same_losses_other_seed_other_losses(tmp_path):
    a, run_a = train_in_process(tmp_path / "a", "seed=3")
    b, run_b = train_in_process(tmp_path / "b", "seed=3")
    c, run_c = train_in_process(tmp_path / "c", "seed=4")
    losses = lambda run: [m["train_loss"] for m in read_metrics(run) if "train_loss" in m]
    assert losses(run_a) == losses(run_b)
    assert losses(run_a) != losses(run_c)


def test_checkpointing_a_part_of_some_blocks_trains_the_same_losses(tmp_path, monkeypatch):
    """schedule.grad_checkpoint with checkpoint_part and checkpoint_layers, through the app: the part and count
    reach the model (one attention module checkpointed), and the losses are a plain run's (the recomputed
    activations are the same numbers)."""
    from tuning_fork import layers

    real, done = layers.checkpoint_blocks, []
    monkeypatch.setattr(layers, "checkpoint_blocks", lambda *a: done.append(real(*a)) or done[-1])  # (the real one)
    losses = lambda run: [m["train_loss"] for m in read_metrics(run) if "train_loss" in m]
    _, plain = train_in_process(tmp_path / "a", "seed=3")
    assert done == []
    _, parts = train_in_process(tmp_path / "b", "seed=3", "schedule.grad_checkpoint=true",
                                "schedule.checkpoint_part=attention", "schedule.checkpoint_layers=1")
    assert done == [1]
    assert len(losses(plain)) >= 2 and losses(parts) == pytest.approx(losses(plain), rel=1e-5)


@pytest.mark.parametrize("adapter", ["dora", "full", "qlora"])
def test_every_adapter_type_trains_and_loads_in_mlx_lm(tmp_path, adapter):
    from mlx_lm import load

    result, run = train_in_process(tmp_path, f"adapter={adapter}")
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < result["first_val_loss"]
    adapter_cfg = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert adapter_cfg["fine_tune_type"] == {"dora": "dora", "full": "full", "qlora": "lora"}[adapter]
    if adapter == "qlora":
        assert adapter_cfg["quantization"] == {"bits": 4, "group_size": 64}
    model, tokenizer = load(adapter_cfg["model"], adapter_path=str(run / "adapters"))
    assert greedy(model, tokenizer, [{"role": "user", "content": "What is 3 plus one?"}], 8) is not None


def test_alpha_becomes_scale_and_num_layers_never_exceeds_the_model(tmp_path):
    _, run = train_in_process(tmp_path, "adapter.rank=4", "adapter.alpha=12", "adapter.num_layers=16")
    adapter_cfg = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert adapter_cfg["lora_parameters"]["scale"] == 3.0
    assert adapter_cfg["num_layers"] == 2  # the tiny model has 2 blocks; 16 (mlx-lm's default) is clamped


def test_epochs_win_over_iters_and_test_split_is_scored(tmp_path):
    result, run = train_in_process(tmp_path, "schedule.epochs=2")
    assert result["iters"] == 12  # ceil(24 / 4) * 2
    assert "test_loss" in result and math.isclose(result["test_ppl"], math.exp(result["test_loss"]))


def test_completions_with_mask_prompt_and_a_prompt_format(tmp_path):
    folder = make_data(tmp_path / "data", fmt="completions")
    result, _ = train_in_process(tmp_path, "data.mask_prompt=true", "prompt=chatml", data=folder)
    assert result["val_loss"] < result["first_val_loss"]


def test_text_records(tmp_path):
    folder = make_data(tmp_path / "data", fmt="text")
    result, _ = train_in_process(tmp_path, data=folder)
    assert result["val_loss"] < result["first_val_loss"]


def test_wandb_offline_run_lives_in_the_run_folder(tmp_path):
    result, run = train_in_process(tmp_path, "wandb.project=tf-tests", "wandb.run=offline-check")
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    import wandb

    assert wandb.run is None  # finished: the next job gets its own run


def test_a_run_without_wandb_does_not_import_it(tmp_path):
    """mlx-lm's tuner package would import W&B (1.2 s of every start); a run that does not log to W&B
    must not pay for it."""
    folder = make_data(tmp_path / "data")
    code = ("import sys\n"
            "from tuning_fork.train import train\n"
            "from tests.conftest import compose_cfg\n"
            f"train(compose_cfg('data=jsonl', 'data.path={folder}', 'output_dir={tmp_path / 'run'}', "
            "'schedule.iters=2', 'schedule.epochs=null'))\n"
            "print('WANDB', 'wandb' in sys.modules, 'mlx_lm.tuner' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WANDB False True" in proc.stdout  # the tuner (LoRA layers) is there; W&B is not


@pytest.mark.slow
def test_greedy_answer_after_the_demo(demo_run):
    """`python -m tuning_fork.generate run=...` answers questions the demo trained on."""
    run_dir, _ = demo_run
    from tuning_fork.data import demo_dir

    records = [json.loads(x) for x in (demo_dir() / "train.jsonl").read_text().splitlines()][:3]
    right = 0
    for rec in records:
        system, user, answer = (m["content"] for m in rec["messages"])
        proc = run_cli(f"run={run_dir}", f"prompt.system={system}", f"prompt.text={user}", "num_tokens=24",
                       module="tuning_fork.generate")
        assert proc.returncode == 0, proc.stderr
        right += proc.stdout.strip() == answer
    assert right >= 2
