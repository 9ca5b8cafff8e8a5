"""Stages and init_from: chained runs start from the previous result; incompatible chains fail first."""

import json

import pytest
import yaml

from .conftest import make_data, read_metrics, run_cli

pytestmark = pytest.mark.slow

SHORT = ["debug=fast"]


def pipeline_dir(tmp_path, stages):
    conf = tmp_path / "conf" / "pipeline"
    conf.mkdir(parents=True)
    (conf / "test_chain.yaml").write_text(yaml.safe_dump({"stages": stages}))
    return tmp_path / "conf"


def vals(folder):
    return [m["val_loss"] for m in read_metrics(folder) if "val_loss" in m]


def test_bundled_cpt_sft_pipeline_runs_both_stages(tmp_path):
    from mlx_lm import load

    run = tmp_path / "run"
    proc = run_cli("pipeline=cpt_sft", f"hydra.run.dir={run}", "schedule.epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("cpt", "sft"):
        assert (run / stage / ".hydra" / "config.yaml").exists() and (run / stage / "metrics.jsonl").exists()
        cfg = json.loads((run / stage / "adapters" / "adapter_config.json").read_text())
        load(cfg["model"], adapter_path=str(run / stage / "adapters"))
    sft = yaml.safe_load((run / "sft" / ".hydra" / "config.yaml").read_text())
    assert sft["data"]["mask_prompt"] is True and sft["init_from"] == str(run / "cpt")
    assert yaml.safe_load((run / "cpt" / ".hydra" / "config.yaml").read_text())["data"]["path"] == "text"


def test_stage_two_starts_from_stage_ones_weights(tmp_path):
    data = make_data(tmp_path / "d")
    stages = [{"name": "a", "overrides": [f"data.path={data}"]}, {"name": "b", "overrides": [f"data.path={data}"]}]
    run = tmp_path / "run"
    proc = run_cli("--config-dir", pipeline_dir(tmp_path, stages), "pipeline=test_chain", "data=jsonl",
                   f"data.path={data}", f"hydra.run.dir={run}", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = vals(run / "a"), vals(run / "b")
    assert b[0] == pytest.approx(a[-1], rel=1e-5)  # not a fresh model's loss ...
    assert a[0] > a[-1] + 0.1  # ... which is what a[0] was
    # one stage alone, in a folder without stage a: it starts fresh
    alone = tmp_path / "alone"
    proc = run_cli("--config-dir", tmp_path / "conf", "pipeline=test_chain", "pipeline.only=b", "data=jsonl",
                   f"data.path={data}", f"hydra.run.dir={alone}", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (alone / "a").exists() and vals(alone / "b")[0] == pytest.approx(a[0], rel=1e-5)


def test_full_then_lora_uses_the_updated_weights_as_base(tmp_path):
    from mlx_lm import load

    data = make_data(tmp_path / "d")
    stages = [{"name": "full", "overrides": ["adapter=full"]}, {"name": "lora", "overrides": []}]
    run = tmp_path / "run"
    proc = run_cli("--config-dir", pipeline_dir(tmp_path, stages), "pipeline=test_chain", "data=jsonl",
                   f"data.path={data}", f"hydra.run.dir={run}", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((run / "lora" / "adapters" / "adapter_config.json").read_text())
    assert cfg["model"] == str((run / "full" / "model").resolve())
    load(cfg["model"], adapter_path=str(run / "lora" / "adapters"))
    assert vals(run / "lora")[0] == pytest.approx(vals(run / "full")[-1], rel=1e-5)


def test_incompatible_chain_fails_before_training(tmp_path):
    data = make_data(tmp_path / "d")
    stages = [{"name": "a", "overrides": []}, {"name": "b", "overrides": ["adapter.rank=8"]}]
    run = tmp_path / "run"
    proc = run_cli("--config-dir", pipeline_dir(tmp_path, stages), "pipeline=test_chain", "data=jsonl",
                   f"data.path={data}", f"hydra.run.dir={run}", *SHORT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "rank 32 -> 8" in proc.stderr
    assert not (run / "a").exists()  # nothing trained


def test_init_from_an_earlier_run_and_its_check(tmp_path):
    data = make_data(tmp_path / "d")
    first = tmp_path / "first"
    assert run_cli("data=jsonl", f"data.path={data}", f"hydra.run.dir={first}", *SHORT).returncode == 0
    second = tmp_path / "second"
    proc = run_cli("data=jsonl", f"data.path={data}", f"hydra.run.dir={second}", f"init_from={first}", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert vals(second)[0] == pytest.approx(vals(first)[-1], rel=1e-5)
    proc = run_cli("data=jsonl", f"data.path={data}", f"hydra.run.dir={tmp_path / 'third'}", f"init_from={first}",
                   "adapter=dora", *SHORT)
    assert proc.returncode == 2 and "fine_tune_type lora -> dora" in proc.stderr
    proc = run_cli("data=jsonl", f"data.path={data}", f"hydra.run.dir={tmp_path / 'fourth'}",
                   f"init_from={tmp_path / 'nothing'}", *SHORT)
    assert proc.returncode == 2 and "init_from" in proc.stderr


def test_one_wandb_run_per_stage_and_summary_per_stage(tmp_path):
    data = make_data(tmp_path / "d")
    stages = [{"name": "a", "overrides": []}, {"name": "b", "overrides": ["data.mask_prompt=true"]}]
    conf = pipeline_dir(tmp_path, stages)
    run = tmp_path / "run"
    proc = run_cli("--config-dir", conf, "pipeline=test_chain", "data=jsonl", f"data.path={data}",
                   f"hydra.run.dir={run}", "wandb.project=tf-tests", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("a", "b"):
        assert len(list((run / stage / "wandb").glob("offline-run-*"))) == 1
    proc = run_cli("--config-dir", conf, "pipeline=test_chain", "data=jsonl", f"data.path={data}",
                   f"hydra.run.dir={tmp_path / 'sum'}", "summary=true", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("mlx_lm.lora --train") == 2
    assert not list((tmp_path / "sum").rglob("adapters.safetensors"))


def test_two_file_mlx_tuning_fork_config_migrates_and_runs(tmp_path):
    text, qa = tmp_path / "text", tmp_path / "qa"
    make_data(text, fmt="text")
    make_data(qa, fmt="completions")
    (tmp_path / "cpt.yaml").write_text(yaml.safe_dump({
        "model": "tiny", "train": True, "data": str(text), "fine_tune_type": "lora", "batch_size": 4,
        "epochs": 1, "evals_per_epoch": 2, "learning_rate": 1e-3, "adapter_path": "adapters",
        "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0}, "clear_cache_threshold": 0}))
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({
        "model": "tiny", "data": str(qa), "batch_size": 4, "iters": 6, "mask_prompt": True,
        "learning_rate": 1e-3, "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0},
        "resume_adapter_file": "adapters/adapters.safetensors", "saves_per_epoch": 1, "mystery_knob": 3}))
    proc = run_cli("cpt.yaml", "sft.yaml", "--name", "old", module="tuning_fork.migrate", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "mystery_knob" in proc.stderr and "clear_cache_threshold" in proc.stderr  # reported ...
    written = (tmp_path / "conf" / "pipeline" / "old.yaml").read_text()
    assert "NOT MIGRATED: sft.yaml: mystery_knob" in written  # ... and kept in the file
    command = proc.stdout.strip().splitlines()[-1].split("python -m tuning_fork ")[1].split()
    run = tmp_path / "run"
    proc = run_cli(*command, f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpt = yaml.safe_load((run / "cpt" / ".hydra" / "config.yaml").read_text())
    sft = yaml.safe_load((run / "sft" / ".hydra" / "config.yaml").read_text())
    assert cpt["schedule"]["iters"] == 6 and cpt["schedule"]["steps_per_eval"] == 3  # epochs 1, 2 evals
    assert sft["data"]["mask_prompt"] and sft["schedule"]["iters"] == 6 and sft["adapter"]["rank"] == 8
    assert vals(run / "sft")[-1] < vals(run / "sft")[0]  # it trained
    # a second migration never overwrites the first
    again = run_cli("cpt.yaml", "sft.yaml", "--name", "old", module="tuning_fork.migrate", cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr
    assert (tmp_path / "conf" / "pipeline" / "old.yaml").read_text() == written


def test_resume_continues_a_pipeline_where_it_stopped(tmp_path):
    """resume=true on a pipeline keeps finished stages and runs (or resumes) the rest."""
    data = make_data(tmp_path / "d")
    stages = [{"name": "a", "overrides": [f"data.path={data}"]}, {"name": "b", "overrides": [f"data.path={data}"]}]
    conf, run = pipeline_dir(tmp_path, stages), tmp_path / "run"
    args = ("--config-dir", conf, "pipeline=test_chain", "data=jsonl", f"data.path={data}", f"hydra.run.dir={run}",
            *SHORT)
    proc = run_cli(*args, "pipeline.only=a")  # as if the pipeline had stopped after its first stage
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = (run / "a" / "metrics.jsonl").read_text()
    proc = run_cli(*args, "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage a: finished" in proc.stdout and (run / "a" / "metrics.jsonl").read_text() == before
    assert vals(run / "b")[0] == pytest.approx(vals(run / "a")[-1], rel=1e-5)


@pytest.mark.parametrize("carry", ["best", "last"])
def test_the_next_stage_starts_from_the_best_adapters_unless_carry_last(tmp_path, carry):
    """Stage a's best adapter is its first (mode=max on the loss), and it stops early at its next validation:
    the pipeline goes on, with carry=best stage b starts from a's first adapters (b's first validation equals
    a's first), with carry=last from a's last."""
    data = make_data(tmp_path / "d")
    stages = [{"name": "a", "overrides": ["schedule.early_stopping.mode=max", "schedule.early_stopping.patience=1"]},
              {"name": "b", "overrides": []}]
    run = tmp_path / "run"
    proc = run_cli("--config-dir", pipeline_dir(tmp_path, stages), "pipeline=test_chain", "data=jsonl",
                   f"data.path={data}", f"hydra.run.dir={run}", f"pipeline.carry={carry}", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = vals(run / "a"), vals(run / "b")
    assert a[0] > a[-1] + 0.1
    assert b[0] == pytest.approx(a[0] if carry == "best" else a[-1], rel=1e-5)
    assert (run / "a" / "adapters" / "best" / "adapters.safetensors").exists()
    assert json.loads((run / "a" / "results.json").read_text())["stopped_early"]  # and the pipeline went on
