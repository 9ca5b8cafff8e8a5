"""data=hf: a Hugging Face data set, here a local copy (no hub): split expressions, counts, errors."""

import json

import pytest

from .conftest import make_data, one_line_error, read_metrics, run_cli

pytest.importorskip("datasets")  # the `hf` extra, which `dev` installs

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_a_local_hf_data_set_trains_with_split_expressions(tmp_path):
    folder = make_data(tmp_path / "d", n_train=24, n_valid=8)  # train.jsonl, valid.jsonl: splits train, validation
    run = tmp_path / "run"
    proc = run_cli("data=hf", f"data.path={folder}", 'data.train_split="train[:50%]"',
                   'data.valid_split="validation[:4]"', "schedule.epochs=2", "schedule.batch_size=4",
                   f"hydra.run.dir={run}", env=OFFLINE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = (run / ".hydra" / "config.yaml").read_text()
    assert "iters: 6" in config  # 12 records of train[:50%], batch 4, 2 epochs
    assert "val_batches: 1" in config  # the 4 records of validation[:4]
    results = json.loads((run / "results.json").read_text())
    assert results["val_loss"] < results["first_val_loss"]
    assert [m["iteration"] for m in read_metrics(run) if "val_loss" in m][-1] == 6


def test_an_unknown_split_is_one_line_naming_the_data_set_and_the_splits_it_has(tmp_path):
    folder = make_data(tmp_path / "d")
    proc = run_cli("data=hf", f"data.path={folder}", "data.valid_split=dev", f"hydra.run.dir={tmp_path / 'run'}",
                   env=OFFLINE)
    one_line_error(proc, f"data.path={folder}", "'dev'", "validation")
    assert not (tmp_path / "run" / "adapters").exists()


def test_a_missing_validation_split_says_how_to_take_one_from_train(tmp_path):
    folder = make_data(tmp_path / "d")
    proc = run_cli("data=hf", f"data.path={folder}", "data.valid_split=null", f"hydra.run.dir={tmp_path / 'run'}",
                   env=OFFLINE)
    one_line_error(proc, "data.valid_split", "train[-10%:]")


@pytest.mark.slow
def test_preference_pairs_from_a_local_hf_data_set(tmp_path):
    from .conftest import pairs_data

    folder = pairs_data(tmp_path / "d")
    run = tmp_path / "run"
    proc = run_cli("data=hf", f"data.path={folder}", "objective=dpo", "debug=fast", f"hydra.run.dir={run}",
                   env=OFFLINE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val_reward_accuracy" in json.loads((run / "results.json").read_text())
