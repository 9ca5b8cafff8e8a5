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


@pytest.mark.slow
def test_a_mixture_of_a_hub_set_and_a_folder_counts_and_trains_both(tmp_path):
    hub = make_data(tmp_path / "hub", n_train=16, n_valid=4)  # a local copy stands in for the hub
    folder = make_data(tmp_path / "jsonl", n_train=8, n_valid=4, fmt="completions")
    args = ["data=mix", "data.sources.hub.source=hf", f"data.sources.hub.path={hub}", "data.sources.hub.valid_split=validation",
            f"data.sources.local.path={folder}", "data.sources.local.epochs=2", "schedule.batch_size=4",
            "schedule.epochs=1", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_cli(*args, "--cfg", "job", "--resolve", env=OFFLINE)
    assert proc.returncode == 0 and "iters: 8\n" in proc.stdout, proc.stderr[-2000:]  # (16 + 2 x 8) / 4
    proc = run_cli(*args, env=OFFLINE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hub 16 of 16 + local 16 of 8 = 32 records per epoch" in proc.stdout
    last = [m for m in read_metrics(tmp_path / "run") if "val_loss/hub" in m][-1]
    assert "val_loss/local" in last
