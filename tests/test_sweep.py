"""Optuna sweeps over the train entrypoint: a resumable SQLite study, pruning, failures, launchers,
concurrent sweep processes on one study, and the results people look at."""

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, make_data, read_metrics, run_cli

pytestmark = pytest.mark.slow

FAST = ["debug=fast", "schedule.steps_per_eval=2"]  # validations at 0, 2, 4, 6: room to prune


def study(db, name="tuning_fork"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def sweep(sweep_dir, *args, data):
    return run_cli("--multirun", "hydra/sweeper=tuning_fork_optuna", f"hydra.sweep.dir={sweep_dir}", "data=jsonl",
                   f"data.path={data}", *FAST, *args)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("sweep") / "d")


def test_optuna_preset_study_resumes_and_reports(tmp_path, data):
    sweep_dir = tmp_path / "X"
    args = ["--multirun", "hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}",
            "data=jsonl", f"data.path={data}", *FAST]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = study(sweep_dir / "optuna.db").trials
    assert len(trials) == 2 and all(t.state.is_finished() for t in trials)
    assert {"schedule.learning_rate", "adapter.rank"} <= set(trials[0].params)
    for name in ("trials.csv", "val_loss.png", "optimization_results.yaml"):
        assert (sweep_dir / name).exists(), name
    assert "best val loss" in proc.stdout and "trial" in proc.stdout
    csv = (sweep_dir / "trials.csv").read_text().splitlines()
    assert csv[0].startswith("trial,") and len(csv) == 3
    assert (sweep_dir / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
    again = run_cli(*args, "hydra.sweeper.n_trials=1")  # the same command continues the study
    assert again.returncode == 0, again.stderr[-3000:]
    trials = study(sweep_dir / "optuna.db").trials
    assert len(trials) == 3 and sorted(t.number for t in trials) == list(range(3))
    assert all((sweep_dir / str(n) / "metrics.jsonl").exists() for n in range(3))  # one folder per trial


def test_a_hopeless_trial_is_pruned_before_its_last_iteration(tmp_path, data):
    sweep_dir = tmp_path / "P"
    pruner = ["hydra.sweeper.pruner=median", "hydra.sweeper.pruner_args={n_startup_trials:1,n_warmup_steps:1}"]
    ok = sweep(sweep_dir, "hydra.sweeper.n_trials=1", "schedule.learning_rate=1e-3", *pruner, data=data)
    assert ok.returncode == 0, ok.stderr[-3000:]
    hopeless = sweep(sweep_dir, "hydra.sweeper.n_trials=1", "schedule.learning_rate=1e-9", *pruner, data=data)
    assert hopeless.returncode == 0, hopeless.stderr[-3000:]
    first, second = study(sweep_dir / "optuna.db").trials
    assert first.state.name == "COMPLETE" and second.state.name == "PRUNED"
    last = max(m["iteration"] for m in read_metrics(sweep_dir / "1"))
    assert last < 6  # stopped before its last iteration


def test_failed_and_nan_trials_are_recorded_and_the_sweep_goes_on(tmp_path, data):
    sweep_dir = tmp_path / "N"
    # plain SGD at a learning rate of 1e30 overflows at once: a NaN loss
    proc = sweep(sweep_dir, "hydra.sweeper.sampler=grid", "hydra.sweeper.n_trials=2", "hydra.sweeper.pruner=none",
                 "schedule.optimizer=sgd", "schedule.learning_rate=choice(1e30,1e-3)", data=data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = {t.params["schedule.learning_rate"]: t.state.name for t in study(sweep_dir / "optuna.db").trials}
    assert states == {1e30: "FAIL", 1e-3: "COMPLETE"}
    assert "training loss is nan" in proc.stderr + proc.stdout


def test_joblib_runs_two_jobs_in_parallel_processes(tmp_path, data):
    sweep_dir = tmp_path / "J"
    proc = sweep(sweep_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
                 "hydra.sweeper.n_trials=2", "schedule.learning_rate=choice(1e-3,3e-3)", data=data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = study(sweep_dir / "optuna.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    dirs = {t.user_attrs["run_dir"] for t in trials}
    assert len(dirs) == 2 and all(read_metrics(d) for d in dirs)
    assert "Joblib.Parallel" in proc.stderr + proc.stdout
    # each job wrote only its own folder: its own config, its own learning rate in its own metrics
    for t in trials:
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir.parent == sweep_dir and run_dir.name == str(t.number)
        lr = t.params["schedule.learning_rate"]
        assert f"learning_rate: {lr}" in (run_dir / ".hydra" / "config.yaml").read_text()
        assert all(m["learning_rate"] == pytest.approx(lr, rel=1e-6) for m in read_metrics(run_dir)
                   if "learning_rate" in m)
    sweeper_files = {"optuna.db", "multirun.yaml", "trials.csv", "val_loss.png", "optimization_results.yaml"}
    assert {p.name for p in sweep_dir.iterdir()} - sweeper_files == {"0", "1"}


def test_submitit_local_launcher(tmp_path, data):
    sweep_dir = tmp_path / "S"
    proc = sweep(sweep_dir, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                 "hydra.sweeper.n_trials=1", "schedule.learning_rate=1e-3", data=data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (trial,) = study(sweep_dir / "optuna.db").trials
    assert trial.state.name == "COMPLETE" and (sweep_dir / ".submitit").exists()


def test_two_sweep_processes_share_one_study(tmp_path, data):
    db = tmp_path / "shared.db"
    args = ["hydra.sweeper.n_trials=2", f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.pruner=none",
            "schedule.learning_rate=tag(log,interval(1e-4,1e-2))"]
    procs = [subprocess.Popen([sys.executable, "-m", "tuning_fork", "--multirun", "hydra/sweeper=tuning_fork_optuna",
                               f"hydra.sweep.dir={tmp_path / name}", "data=jsonl", f"data.path={data}", *FAST, *args],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("A", "B")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    trials = study(db).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # no trial run twice
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.params["schedule.learning_rate"] for t in trials}) == 4


def test_wandb_sweep_offline_one_run_per_job(tmp_path, data):
    sweep_dir = tmp_path / "Y"
    proc = run_cli("--multirun", "hparams_search=wandb", f"hydra.sweep.dir={sweep_dir}", "data=jsonl",
                   f"data.path={data}", *FAST, "hydra.sweeper.sweep.run_cap=2", env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = study(sweep_dir / "optuna.db", "wandb_sweep").trials
    assert len(trials) == 2
    assert {"schedule.learning_rate", "schedule.batch_size", "adapter.rank", "adapter.dropout"} == set(trials[0].params)
    for t in trials:
        runs = list((sweep_dir / str(t.number) / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, t.number  # its own offline W&B run
    saved = (sweep_dir / "0" / ".hydra" / "config.yaml").read_text()
    assert f"group: local-{sweep_dir.name}" in saved and "sweep_id: local-Y" in saved
    assert (sweep_dir / "trials.csv").exists() and (sweep_dir / "val_loss.png").exists()
    assert "W&B sweep" in proc.stdout


def test_wandb_sweep_from_a_file_grid(tmp_path, data):
    spec = tmp_path / "my_sweep.yaml"
    spec.write_text("method: grid\nmetric: {name: val_loss, goal: minimize}\nparameters:\n"
                    "  schedule.learning_rate: {values: [0.001, 0.003]}\n  adapter.rank: {value: 8}\n")
    sweep_dir = tmp_path / "G"
    proc = run_cli("--multirun", "hparams_search=wandb", f"hydra.sweeper.sweep_config={spec}",
                   f"hydra.sweep.dir={sweep_dir}", "data=jsonl", f"data.path={data}", *FAST,
                   env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = study(sweep_dir / "optuna.db", "wandb_sweep").trials
    assert sorted(t.params["schedule.learning_rate"] for t in trials) == [0.001, 0.003]  # the whole grid, once
    assert "rank: 8" in (sweep_dir / "0" / ".hydra" / "config.yaml").read_text()


def test_cluster_launcher_preset_composes():
    proc = run_cli("hparams_search=optuna", "hydra/launcher=slurm", "--cfg", "hydra")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SlurmLauncher" in proc.stdout and "gpus_per_node: 1" in proc.stdout


def test_a_sweep_maximizes_a_task_metric_and_an_early_stop_is_complete(tmp_path, data):
    import json

    sweep_dir = tmp_path / "M"
    proc = sweep(sweep_dir, "hydra.sweeper.n_trials=1", "hydra.sweeper.direction=maximize",
                 "optimized_metric=best_val_token_f1", "eval.generate.records=2", "eval.generate.max_tokens=4",
                 "schedule.early_stopping.patience=1", "schedule.early_stopping.mode=max", data=data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = study(sweep_dir / "optuna.db")
    assert s.direction.name == "MAXIMIZE"
    (trial,) = s.trials
    result = json.loads((sweep_dir / "0" / "results.json").read_text())
    assert trial.state.name == "COMPLETE" and result["stopped_early"] and result["iteration"] == 2
    assert trial.value == result["best_val_token_f1"]


@pytest.mark.parametrize("args,needle", [
    (["hparams_search=wandb", "hydra.sweeper.sweep_config=/nonexistent/sweep.yaml"], "sweep_config"),
    (["hparams_search=wandb", "hydra.sweeper.sweep.metric.name=best_val_los"], "optimized_metric='best_val_los'"),
    (["hparams_search=optuna", "optimized_metric=val_exact_match"], "eval.generate.records > 0"),
    (["hparams_search=optuna", "hydra.sweeper.sampler=nope"], "hydra.sweeper.sampler=nope"),
    (["hparams_search=optuna", "hydra.sweeper.pruner=nope"], "pruner=nope"),
])
def test_bad_sweep_settings_are_one_line(tmp_path, args, needle):
    proc = run_cli("--multirun", *args, f"hydra.sweep.dir={tmp_path / 'bad'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bad" / "optuna.db").exists()  # refused before any study
