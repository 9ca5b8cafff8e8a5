"""Reliability: stopped runs resume exactly, signals checkpoint, a crash during a save loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import (
    ROOT,
    adapters,
    compose_cfg,
    make_data,
    max_difference,
    one_line_error,
    reports,
    run_cli,
    wait_for_iteration,
)

pytestmark = pytest.mark.slow

# 120 steps of 2 records: long enough to stop midway, short enough for CI. Dropout on: the random
# generator's state must also come back right.
RUN = ("data=jsonl", "schedule.batch_size=2", "schedule.iters=120", "schedule.epochs=null",
       "schedule.steps_per_report=1", "schedule.steps_per_eval=10", "schedule.save_every=5",
       "adapter.dropout=0.1")


def start(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "tuning_fork", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def stop_midway(run_dir, at: int, *args, signals=(signal.SIGTERM,), env=None):
    """Start a run, send `signals` once it has reported iteration `at`; return (returncode, stderr)."""
    proc = start(*args, f"hydra.run.dir={run_dir}", env=env)
    wait_for_iteration(run_dir, at, proc)
    for k, sig in enumerate(signals):
        if k:
            time.sleep(0.05)
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = make_data(tmp_path_factory.mktemp("data") / "d", n_train=20, n_test=4)
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    proc = run_cli(*RUN, f"data.path={folder}", f"hydra.run.dir={run_dir}", "wandb.project=resume-test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, run_dir


def test_sigterm_midway_then_resume_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    folder, whole = uninterrupted
    run_dir = tmp_path / "run"
    args = (*RUN, f"data.path={folder}", "wandb.project=resume-test")
    code, err = stop_midway(run_dir, 12, *args)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("tuning_fork: error:")]
    assert len(line) == 1 and "SIGTERM stopped the run at iteration" in line[0], err[-2000:]
    assert f"hydra.run.dir={run_dir} resume=true" in line[0] and "schedule.iters=120" in line[0]
    stopped_at = int(line[0].split("at iteration ")[1].split()[0])
    assert 12 <= stopped_at < 120
    assert (run_dir / "checkpoints" / f"{stopped_at:07d}" / "state.json").exists()
    assert not (run_dir / "results.json").exists()

    proc = run_cli(*args, f"hydra.run.dir={run_dir}", "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed at iteration {stopped_at}" in proc.stdout
    # one continuous record: every report once, the same numbers as the run that was never stopped
    got, want = reports(run_dir), reports(whole)
    assert [m["iteration"] for m in got] == [m["iteration"] for m in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a, b)
    assert max_difference(adapters(run_dir), adapters(whole)) < 1e-5
    result = json.loads((run_dir / "results.json").read_text())
    assert result["iters"] == 120
    # W&B resumed the same run: one run id in the run folder
    ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(ids) == 1, ids


def test_a_second_ctrl_c_exits_at_once_and_what_was_saved_resumes(uninterrupted, tmp_path):
    folder, whole = uninterrupted
    run_dir = tmp_path / "run"
    code, err = stop_midway(run_dir, 12, *RUN, f"data.path={folder}", signals=(signal.SIGINT, signal.SIGINT))
    # the second Ctrl-C normally lands before the step ends (exit 130 at once); when the first stop was
    # quicker it lands while Python shuts down, which ends the process by SIGINT itself (-2): either way
    # at once, and nothing written is damaged
    assert code in (128 + signal.SIGINT, -signal.SIGINT), err[-2000:]
    assert "Traceback" not in err
    assert "stopped at once" in err or "SIGINT stopped the run" in err, err[-2000:]
    proc = run_cli(*RUN, f"data.path={folder}", f"hydra.run.dir={run_dir}", "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_difference(adapters(run_dir), adapters(whole)) < 1e-5


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    from tuning_fork.train import train

    folder = make_data(tmp_path / "d", n_train=20)
    overrides = ("data=jsonl", f"data.path={folder}", f"output_dir={tmp_path / 'run'}",
                 "schedule.batch_size=2", "schedule.iters=20", "schedule.epochs=null", "schedule.save_every=5",
                 "schedule.steps_per_eval=10", "schedule.steps_per_report=5")
    real_replace = os.replace

    def crash_on_second_checkpoint(src, dst):
        if str(src).endswith(".0000010.tmp"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second_checkpoint)
    with pytest.raises(OSError, match="No space left"):
        train(compose_cfg(*overrides))
    monkeypatch.setattr(os, "replace", real_replace)
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".")) == ["0000005"]
    # adapters.safetensors is still step 5's, whole and loadable
    assert max_difference(adapters(run_dir), adapters(run_dir, "0000005_adapters.safetensors")) == 0
    result = train(compose_cfg(*overrides, "resume=true"))
    assert result["iters"] == 20
    whole = train(compose_cfg(*overrides[:2], f"output_dir={tmp_path / 'whole'}", *overrides[3:]))
    assert max_difference(adapters(run_dir), adapters(tmp_path / "whole")) < 1e-5
    assert result["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)


def test_a_run_resumes_with_checkpointing_turned_on_and_trains_the_same_numbers(tmp_path):
    """A run that ran out of memory resumes with schedule.grad_checkpoint (and which part): the backward pass then
    recomputes what it kept, so the reports and adapters are those of a run never stopped. (Without dropout: with
    it, a checkpointed block draws its masks from a key of its own, a different but equally valid draw.)"""
    folder = make_data(tmp_path / "d", n_train=20, n_test=4)
    args = (*[a for a in RUN if not a.startswith("adapter.dropout")], f"data.path={folder}")
    whole, run_dir = tmp_path / "whole", tmp_path / "run"
    assert run_cli(*args, f"hydra.run.dir={whole}").returncode == 0
    stop_midway(run_dir, 6, *args)
    proc = run_cli(*args, f"hydra.run.dir={run_dir}", "resume=true", "schedule.grad_checkpoint=true",
                   "schedule.checkpoint_part=attention", "schedule.checkpoint_layers=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = reports(run_dir), reports(whole)
    assert [m["iteration"] for m in got] == [m["iteration"] for m in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6) for k in a), (a, b)
    assert max_difference(adapters(run_dir), adapters(whole)) < 1e-5


def test_resume_refuses_a_folder_without_a_checkpoint(tmp_path):
    one_line_error(run_cli(f"hydra.run.dir={tmp_path / 'run'}", "resume=true"), "holds no checkpoint",
                   "without resume=true")


def test_resume_refuses_changed_settings(uninterrupted, tmp_path):
    folder, _ = uninterrupted
    run_dir = tmp_path / "run"
    stop_midway(run_dir, 6, *RUN, f"data.path={folder}")
    before = (run_dir / "metrics.jsonl").read_text()
    one_line_error(run_cli(*RUN, f"data.path={folder}", f"hydra.run.dir={run_dir}", "resume=true",
                           "schedule.learning_rate=0.5"), "schedule.learning_rate=0.5", "resume with the same")
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_a_finished_run_cannot_be_resumed(uninterrupted):
    folder, whole = uninterrupted
    one_line_error(run_cli(*RUN, f"data.path={folder}", f"hydra.run.dir={whole}", "resume=true",
                           "wandb.project=resume-test"), "finished run")


def test_a_diverging_run_names_the_iteration_and_the_last_good_checkpoint(tmp_path):
    folder = make_data(tmp_path / "d", n_train=20)
    proc = run_cli("data=jsonl", f"data.path={folder}", f"hydra.run.dir={tmp_path / 'run'}",
                   "schedule.batch_size=2", "schedule.iters=40", "schedule.epochs=null", "schedule.save_every=1",
                   "schedule.learning_rate=1e20", "schedule.optimizer=sgd")
    error = one_line_error(proc, "training loss is", "at iteration", "lower schedule.learning_rate")
    assert "last good checkpoint is" in error and "_adapters.safetensors" in error
    good = error.split("last good checkpoint is ")[1].split(")")[0]
    import mlx.core as mx

    assert all(mx.isfinite(v).all().item() for v in mx.load(good).values())


def test_credentials_never_reach_the_run_folder(tmp_path):
    """A W&B API key in the environment, and a config key that looks like a credential, stay out of every
    file the run writes (configs, logs, metrics, W&B's offline files)."""
    folder = make_data(tmp_path / "d", n_train=8)
    secret = "a1b2c3d4e5f6a7b8c9d0a1b2c3d4e5f6a7b8c9d0"
    run_dir = tmp_path / "run"
    proc = run_cli("data=jsonl", f"data.path={folder}", f"hydra.run.dir={run_dir}", "schedule.iters=2",
                   "schedule.epochs=null", "schedule.batch_size=4", "wandb.project=secrets",
                   f"+schedule.optimizer_args.api_token={secret}", env={"WANDB_API_KEY": secret})
    # (the optimizer refuses the made-up argument: what matters is what got written before that)
    assert "api_token" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("data=jsonl", f"data.path={folder}", f"hydra.run.dir={tmp_path / 'run2'}", "schedule.iters=2",
                   "schedule.epochs=null", "schedule.batch_size=4", "wandb.project=secrets",
                   env={"WANDB_API_KEY": secret})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name, extra in (("summary", ["summary=true"]), ("pipeline", ["pipeline=cpt_sft", "summary=true"])):
        proc = run_cli(f"hydra.run.dir={tmp_path / name}", f"+schedule.optimizer_args.api_token={secret}",
                       "wandb.project=secrets", *extra, env={"WANDB_API_KEY": secret})  # nothing trains
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (tmp_path / name / ".hydra" / "overrides.yaml").exists()  # Hydra writes it all the same
    folders = (run_dir, tmp_path / "run2", tmp_path / "summary", tmp_path / "pipeline")
    written = [p for d in folders if d.exists() for p in d.rglob("*") if p.is_file()]
    assert any(p.name == "metrics.jsonl" for p in written) and any("wandb" in p.parts for p in written)
    assert any(p.name == "overrides.yaml" for p in written)  # Hydra's record of the command line, scrubbed
    for p in written:
        assert secret.encode() not in p.read_bytes(), p


def test_remote_code_is_never_trusted_by_default():

    for model in ("tiny", "mistral", "llama3", "llama3_2", "qwen", "gemma", "phi"):
        assert compose_cfg(f"model={model}").model.trust_remote_code is False


def test_the_first_signal_asks_to_stop_and_the_second_stops_at_once():
    script = ("import os, signal, time\n"
              "from tuning_fork.checkpoint import StopSignals\n"
              "with StopSignals() as stop:\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(0.2)\n"
              "    assert stop.signal == signal.SIGINT, 'the first signal must only ask'\n"
              "    print('asked', flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(10)\n"
              "    print('still running')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.stdout == "asked\n" and proc.returncode == 128 + signal.SIGINT, (proc.stdout, proc.stderr)
    assert "stopped at once" in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_saved_before_a_setting_existed_resumes_but_a_changed_setting_is_refused(tmp_path):
    """A key newer than the saved run (schedule.lean_layers, say) is not a difference; a changed one is."""
    from tuning_fork.checkpoint import check_same_config
    from tuning_fork.errors import ConfigError

    saved = {"schedule": {"batch_size": 4}, "adapter": {"rank": 8}}
    check_same_config(saved, {"schedule": {"batch_size": 4, "lean_layers": True}, "adapter": {"rank": 8}}, tmp_path)
    with pytest.raises(ConfigError, match=r"schedule\.batch_size=8"):
        check_same_config(saved, {"schedule": {"batch_size": 8, "lean_layers": True}, "adapter": {"rank": 8}}, tmp_path)
