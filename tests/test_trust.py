"""Numbers to pick by: a representative validation sample, the best adapter, early stopping, task metrics."""

import json
import math
import os
import signal

import numpy as np
import pytest

from tuning_fork import evaluation
from tuning_fork.errors import ConfigError

from .conftest import chat, compose_cfg, make_data, read_metrics, run_cli, write_jsonl

SHORT = ("data=jsonl", "debug=fast", "schedule.iters=12")  # validations at 0, 3, 6, 9, 12


def skewed_data(folder, n_train=24, n_valid=40):
    """Validation records of very different lengths: a quarter of them eight times longer."""
    def rec(i):
        answer = f"{i} plus one is {i + 1}."
        return chat(f"What is {i} plus one?", answer + (" It follows from counting on by one." * 6 if i % 4 == 0 else ""))

    write_jsonl(folder / "train.jsonl", [rec(i) for i in range(n_train)])
    write_jsonl(folder / "valid.jsonl", [rec(100 + i) for i in range(n_valid)])
    return folder


def train(tmp_path, *overrides, data=None, name="run", hooks=()):
    from tuning_fork.train import train as run

    folder = data or make_data(tmp_path / "data")
    cfg = compose_cfg(*SHORT, f"data.path={folder}", f"output_dir={tmp_path / name}", *overrides)
    return run(cfg, hooks=hooks), tmp_path / name


# ------------------------------------------------------------------------------------ validation sample


def test_the_sample_spans_every_length_and_is_the_same_for_the_same_seed():
    lengths = list(np.random.default_rng(0).integers(5, 500, 200))
    sample = evaluation.validation_sample(lengths, 20, seed=3)
    assert len(sample) == len(set(sample)) == 20
    assert sample == evaluation.validation_sample(lengths, 20, seed=3)
    assert sample != evaluation.validation_sample(lengths, 20, seed=4)
    chosen = sorted(lengths[i] for i in sample)
    ranked = sorted(lengths)
    for k, length in enumerate(chosen):  # one record from each tenth... twentieth of the length ranking
        assert ranked[k * 10] <= length <= ranked[k * 10 + 9]
    assert evaluation.validation_sample(lengths, 500, seed=3) == list(range(200))


def test_partial_validation_scores_long_records_too_and_the_end_scores_the_whole_split(tmp_path):
    """val_batches=2 of 10: every validation scores the same stratified sample (its loss is close to the
    whole split's), the final one also scores the whole split, and summary says what share is validated."""
    data = skewed_data(tmp_path / "d")
    result, run_dir = train(tmp_path, "schedule.val_batches=2", data=data)
    vals = [m for m in read_metrics(run_dir) if "val_loss" in m]
    full = [m for m in read_metrics(run_dir) if "val_loss_full" in m]
    assert [m["iteration"] for m in vals] == [0, 3, 6, 9, 12]
    assert len(full) == 1 and full[0]["iteration"] == 12
    assert result["val_loss_full"] == full[0]["val_loss_full"] != result["val_loss"]
    # the old way (the shortest eight records) is far from the whole split; the sample is close to it
    from mlx_lm import load

    from tuning_fork import data as data_module
    from tuning_fork import models
    from tuning_fork.evaluation import evaluate
    from tuning_fork.objectives import build

    cfg = compose_cfg(*SHORT, f"data.path={data}", f"output_dir={tmp_path / 'x'}", "schedule.val_batches=2")
    model, tokenizer = load(models.resolve("tiny"))
    objective = build(cfg)
    records = objective.encode(data_module.load_splits(cfg.data), tokenizer)["valid"]
    lengths = objective.lengths(records)
    whole = evaluate(model, objective.eval_batches(records), objective.eval_loss)
    shortest = sorted(range(len(records)), key=lambda i: lengths[i])[:8]
    sample = evaluation.validation_sample(lengths, 8, cfg.seed)
    biased = evaluate(model, objective.eval_batches(records, shortest), objective.eval_loss)
    fair = evaluate(model, objective.eval_batches(records, sample), objective.eval_loss)
    assert max(lengths[i] for i in sample) > 2 * max(lengths[i] for i in shortest)
    assert abs(fair - whole) < abs(biased - whole)
    assert vals[0]["val_loss"] == pytest.approx(fair, rel=1e-5)  # the run scored exactly that sample
    summary = run_cli(*SHORT, f"data.path={data}", "schedule.val_batches=2", "summary=true",
                      f"hydra.run.dir={tmp_path / 's'}")
    assert summary.returncode == 0, summary.stderr[-2000:]
    assert "8 of 40 records (20%)" in summary.stdout and "stratified" in summary.stdout


# ------------------------------------------------------------------------------- best adapter, stopping


@pytest.mark.slow
def test_the_best_adapter_is_the_one_that_scored_best(tmp_path):
    """mode=max on the loss makes the first validation the best: adapters/best is that adapter (it scores
    the first validation loss again, in mlx-lm), not the last; generate run= takes it unless checkpoint=last."""
    from mlx_lm import load

    from tuning_fork.evaluation import evaluate
    from tuning_fork.objectives import build

    result, run_dir = train(tmp_path, "schedule.early_stopping.mode=max")
    best = run_dir / "adapters" / "best"
    assert (best / "adapters.safetensors").exists() and (best / "adapter_config.json").exists()
    assert result["best_iteration"] == 0 and result["iteration"] == 12
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["best_iteration"] == 0 and saved["best_val_loss"] == result["best_val_loss"]
    cfg_json = json.loads((best / "adapter_config.json").read_text())
    model, tokenizer = load(cfg_json["model"], adapter_path=str(best))
    cfg = compose_cfg(*SHORT, f"data.path={tmp_path / 'data'}", f"output_dir={tmp_path / 'y'}")
    from tuning_fork import data as data_module

    objective = build(cfg)
    records = objective.encode(data_module.load_splits(cfg.data), tokenizer)["valid"]
    assert result["validated_records"] == 4  # a sample of the 8: score the same records
    sample = evaluation.validation_sample(objective.lengths(records), 4, cfg.seed)
    again = evaluate(model, objective.eval_batches(records, sample), objective.eval_loss)
    assert again == pytest.approx(result["first_val_loss"], rel=1e-4)
    assert abs(again - result["val_loss"]) > 1e-3

    from tuning_fork.generate import choose_model

    for checkpoint, folder in (("best", best), ("last", run_dir / "adapters")):
        gen = compose_generate(f"run={run_dir}", f"checkpoint={checkpoint}")
        assert choose_model(gen)[1] == str(folder)


def compose_generate(*overrides):
    from hydra import compose, initialize_config_module

    from tuning_fork import config

    config.register()
    with initialize_config_module("tuning_fork.conf"):
        return compose("generate", overrides=list(overrides))


@pytest.mark.slow
def test_early_stopping_ends_the_run_normally(tmp_path):
    result, run_dir = train(tmp_path, "schedule.early_stopping.patience=2", "schedule.early_stopping.mode=max",
                            "schedule.steps_per_eval=2")
    assert result["stopped_early"] is True and result["iteration"] == 4 and result["iters"] == 12
    metrics = read_metrics(run_dir)
    assert max(m["iteration"] for m in metrics) == 4
    assert any(m.get("stopped_early") for m in metrics)
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["stopped_early"] is True and "early stopping" in saved["stop_reason"]
    assert (run_dir / "checkpoints" / "0000004").is_dir() and (run_dir / "adapters" / "adapters.safetensors").exists()


@pytest.mark.slow
def test_min_delta_counts_small_improvements_as_none(tmp_path):
    """With a min_delta larger than any change, every validation waits: patience 2 stops at the second."""
    result, _ = train(tmp_path, "schedule.early_stopping.patience=2", "schedule.early_stopping.min_delta=100",
                      "schedule.steps_per_eval=2")
    assert result["stopped_early"] and result["iteration"] == 4
    assert result["best_iteration"] == 4  # the best adapter still follows every improvement


@pytest.mark.slow
def test_a_resumed_run_keeps_its_patience(tmp_path):
    """Patience 3, validations every 2 steps that never improve (mode=max): it stops at 6. Interrupted at 5
    (two validations waited) and resumed, it still stops at 6, not 3 validations after the resume."""
    from tuning_fork.checkpoint import Interrupted
    from tuning_fork.tracking import Hook

    class SignalAt(Hook):
        def on_validation(self, run, info):
            if info["iteration"] == 4:
                os.kill(os.getpid(), signal.SIGINT)

    args = ("schedule.early_stopping.patience=3", "schedule.early_stopping.mode=max", "schedule.steps_per_eval=2",
            "schedule.save_every=2")
    with pytest.raises(Interrupted):
        train(tmp_path, *args, hooks=[SignalAt()])
    result, _ = train(tmp_path, *args, "resume=true")
    assert result["stopped_early"] and result["iteration"] == 6


def test_the_state_round_trips_with_its_patience():
    from tuning_fork.checkpoint import TrainState

    state = TrainState(step=7)
    state.best.update(2, 1.5, 0.0)
    state.best.update(4, 1.6, 0.0)
    again = TrainState.from_json(json.loads(json.dumps(state.to_json())))
    assert again == state and again.best.waited == 1 and again.best.iteration == 2
    old = TrainState.from_json({"step": 3, "window": [1.0, 2, 1, 0.5], "trained_tokens": 9, "wandb_id": None,
                                "config": {}})
    assert old.window.tokens == 2 and old.best.value is None


# ----------------------------------------------------------------------------------------- task metrics


def test_metric_definitions():
    assert evaluation.exact_match("The Answer.", "answer") == 1.0
    assert evaluation.exact_match("an answer!", "answers") == 0.0
    assert evaluation.token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert evaluation.token_f1("", "") == 1.0 and evaluation.token_f1("x", "") == 0.0
    assert evaluation.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert 0 < evaluation.rouge_l("the cat on the mat", "the cat sat on the mat") < 1
    assert evaluation.direction("best_val_exact_match") == "max" and evaluation.direction("val_loss") == "min"


@pytest.mark.slow
def test_task_metrics_at_every_validation_and_as_optimized_metric(tmp_path):
    result, run_dir = train(tmp_path, "eval.generate.records=4", "eval.generate.max_tokens=12",
                            "optimized_metric=best_val_token_f1", "schedule.early_stopping.metric=val_rouge_l",
                            "schedule.learning_rate=1e-3")
    vals = [m for m in read_metrics(run_dir) if "val_loss" in m]
    for m in vals:
        for key in ("val_exact_match", "val_token_f1", "val_rouge_l"):
            assert 0.0 <= m[key] <= 1.0
    assert result["best_val_token_f1"] == max(m["val_token_f1"] for m in vals)
    rouge = [m["val_rouge_l"] for m in vals]
    assert result["best_iteration"] == vals[int(np.argmax(rouge))]["iteration"]


def test_task_metrics_and_metric_names_are_checked_before_training(tmp_path):
    from tuning_fork import config

    data = make_data(tmp_path / "d")
    cases = [("optimized_metric=best_val_los", "optimized_metric='best_val_los'"),
             ("optimized_metric=test_loss", "needs a test split"),
             ("optimized_metric=best_val_exact_match", "eval.generate"),  # not logged without task metrics
             ("schedule.early_stopping.metric=val_rouge_l", "eval.generate.records > 0")]
    for override, needle in cases:
        cfg = compose_cfg(*SHORT, f"data.path={data}", f"output_dir={tmp_path / 'r'}", override)
        with pytest.raises(ConfigError) as e:
            config.check(cfg)
            config.check_optimized_metric(cfg, has_test=False)
        assert needle in str(e.value), (override, str(e.value))
    with pytest.raises(Exception) as e:  # a fixed choice: refused at composition, with the choices
        compose_cfg("eval.generate.metrics=[bleu]")
    assert "expected one of [exact_match, token_f1, rouge_l]" in str(e.value.__cause__)
    proc = run_cli(*SHORT, f"data.path={data}", "optimized_metric=best_val_los", f"hydra.run.dir={tmp_path / 'c'}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "best_val_loss" in proc.stderr
    assert not (tmp_path / "c" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------------- defects


@pytest.mark.slow
@pytest.mark.parametrize("override", ["data.packing=true", "data.too_long=drop"])
def test_derived_iterations_are_one_epoch_of_what_trains(tmp_path, override):
    """Packing (fewer rows than records) and dropped records: the derived iters is one epoch of rows."""
    data = make_data(tmp_path / "d", n_train=24)
    lines = (data / "train.jsonl").read_text().splitlines()
    long = json.loads(lines[0])
    long["messages"][1]["content"] = "and on " * 200
    (data / "train.jsonl").write_text("\n".join([json.dumps(long)] * 8 + lines) + "\n")  # 32 records, 8 too long
    from tuning_fork.train import train as run

    cfg = compose_cfg("data=jsonl", f"data.path={data}", f"output_dir={tmp_path / 'r'}", "schedule.batch_size=4",
                      "schedule.epochs=null", "data.max_seq_length=128", override)
    result = run(cfg)
    assert result["iters"] < 8  # the resolver counts 32 records = 8 batches; what trains is fewer
    if "drop" in override:
        assert result["iters"] == 6  # 24 records kept


@pytest.mark.slow
def test_records_with_no_target_token_are_dropped_not_nan(tmp_path, capfd):
    data = make_data(tmp_path / "d", n_train=12)
    records = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    records[0]["messages"][0]["content"] = "a very long question " * 40
    write_jsonl(data / "train.jsonl", records)
    result, _ = train(tmp_path, "data.mask_prompt=true", "data.max_seq_length=96", data=data)
    assert math.isfinite(result["train_loss"])
    assert "1 of 12 train records have no target token" in capfd.readouterr().out
    from tuning_fork.train import train as run

    cfg = compose_cfg(*SHORT, f"data.path={data}", f"output_dir={tmp_path / 'e'}", "data.mask_prompt=true",
                      "data.max_seq_length=96", "data.too_long=error")
    with pytest.raises(Exception, match="data.max_seq_length=96"):  # refused: too long, and nothing to learn
        run(cfg)


def test_full_fine_tuning_of_a_quantized_model_is_refused_before_any_work():
    from tuning_fork import config

    cfg = compose_cfg("adapter=full", "model.quantize_bits=4")
    with pytest.raises(ConfigError, match="adapter=full cannot train a quantized model"):
        config.check(cfg)
    cfg = compose_cfg("model.path=./elsewhere", "schedule=demo")
    with pytest.raises(ConfigError, match="schedule=default"):
        config.check_recipe(cfg)


def test_ctrl_c_outside_the_loop_exits_130():
    from tuning_fork.cli import run_app

    def interrupted(cfg):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        run_app(interrupted, None)
    assert e.value.code == 130


def test_the_console_script_patches_follower_ranks():
    from pathlib import Path

    import tomllib

    from tuning_fork.__main__ import cli

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["tuning-fork"] == "tuning_fork.__main__:cli"
    import sys

    argv = sys.argv
    try:
        sys.argv = ["tuning-fork", "--cfg", "hydra"]
        os.environ["MLX_RANK"] = "1"
        try:
            cli()
        except SystemExit:
            pass
        assert "hydra.output_subdir=null" in sys.argv
    finally:
        sys.argv = argv
        os.environ.pop("MLX_RANK")


def test_a_follower_rank_has_no_trial_reporter():
    from omegaconf import OmegaConf

    from tuning_fork.trial import TrialHook

    hook = TrialHook(OmegaConf.create({"optuna": {}, "optimized_metric": "best_val_rouge_l"}), "x", rank=1)
    assert hook.reporter is None and hook.metric == "val_rouge_l"
