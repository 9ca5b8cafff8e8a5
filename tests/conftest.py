"""Shared helpers: the CLI as a user runs it, small data sets written by the tests, one demo run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# On the CPU, MLX compiles each fused kernel of a compiled step with the system's C++ compiler (~0.26 s a
# kernel, cached in $TMPDIR/mlx): a fresh machine's first tiny run spends 16 of its 18 s there, and each new
# dropout or scale value makes new kernels. The tests train many short runs of many settings, so they run
# the step uncompiled (set before MLX loads; subprocesses inherit it); test_step.py checks that the compiled
# step gives the same losses and gradients.
os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
# The suite runs in a worker process per core (pytest-xdist; pyproject.toml): one BLAS thread each, so the
# workers share the cores instead of fighting over them (1.67x faster than one process on 2 cores). A test
# file runs on one worker (--dist loadfile, pyproject.toml): the demo's tests (test_train.py) share one demo
# run, and at most one two-process test (test_distributed.py) runs at a time.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("MKL_NUM_THREADS", "1")

from tuning_fork.tracking import read_metrics  # noqa: F401  (the tests read metrics.jsonl as the app does)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    """No hub, W&B offline, and a fresh cache: the built-in model is built by the tests themselves."""
    cache = tmp_path_factory.mktemp("cache")
    env = {"TUNING_FORK_CACHE": str(cache), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "NO_COLOR": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_cli(*args, module="tuning_fork", cwd=None, env=None, timeout=600):
    """`python -m tuning_fork ARGS` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def make_data(folder: Path, n_train=24, n_valid=8, n_test=0, fmt="chat") -> Path:
    """A small, learnable data set: 'What is N plus one?' -> 'N plus one is M.'"""
    def rec(i):
        q, a = f"What is {i} plus one?", f"{i} plus one is {i + 1}."
        if fmt == "chat":
            return chat(q, a)
        if fmt == "completions":
            return {"prompt": q, "completion": a}
        return {"text": f"{q} {a}"}

    write_jsonl(folder / "train.jsonl", [rec(i) for i in range(n_train)])
    write_jsonl(folder / "valid.jsonl", [rec(100 + i) for i in range(n_valid)])
    if n_test:
        write_jsonl(folder / "test.jsonl", [rec(200 + i) for i in range(n_test)])
    return folder


def pairs_data(folder, n_train=16, n_valid=8, chat=False, seen=False):
    """Pairs (the right sum chosen, a wrong one rejected); seen=True validates on the training pairs."""
    def rec(i):
        q, good, bad = f"What is {i} plus one?", f"{i} plus one is {i + 1}.", f"{i} plus one is {i + 7}."
        if chat:
            head = [{"role": "user", "content": q}]
            return {"chosen": head + [{"role": "assistant", "content": good}],
                    "rejected": head + [{"role": "assistant", "content": bad}]}
        return {"prompt": q, "chosen": good, "rejected": bad}

    write_jsonl(folder / "train.jsonl", [rec(i) for i in range(n_train)])
    write_jsonl(folder / "valid.jsonl", [rec(i if seen else 100 + i) for i in range(n_valid)])
    return folder


def compose_cfg(*overrides):
    """The training app's config for these overrides, through Hydra's compose API (no subprocess)."""
    from hydra import compose, initialize_config_module

    from tuning_fork import config

    config.register()
    with initialize_config_module("tuning_fork.conf"):
        return compose("config", overrides=list(overrides))


def compose_app(name, *overrides):
    """Another app's config (generate, export, serve, evaluate) for these overrides."""
    from hydra import compose, initialize_config_module

    from tuning_fork import config

    config.register()
    with initialize_config_module("tuning_fork.conf"):
        return compose(name, overrides=list(overrides))


def one_line_error(proc, *needles):
    """A CLI failure as the README promises it: exit 2, one `tuning_fork: error:` line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tuning_fork: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------------- stopping and resuming runs


def adapters(run_dir, name="adapters.safetensors"):
    import mlx.core as mx

    return mx.load(str(run_dir / "adapters" / name))


def max_difference(a, b) -> float:
    import mlx.core as mx

    assert a.keys() == b.keys()
    return max(mx.abs(a[k] - b[k]).max().item() for k in a)


def reports(run_dir):
    return [{k: m[k] for k in ("iteration", "train_loss", "val_loss", "trained_tokens", "test_loss") if k in m}
            for m in read_metrics(run_dir)]


def assert_resumed_exactly(run_dir, whole) -> None:
    """A resumed run's reports and adapters are those of the run that was never stopped."""
    import pytest

    got, want = reports(run_dir), reports(whole)
    assert [m["iteration"] for m in got] == [m["iteration"] for m in want]
    for a, b in zip(got, want):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a, b)
    assert max_difference(adapters(run_dir), adapters(whole)) < 1e-5


def wait_for_iteration(run_dir, at_least: int, proc, timeout=120):
    """Until the run in `run_dir` has reported iteration `at_least` (the process must still run)."""
    import time

    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, "the run ended before it could be stopped"
        try:
            if any(m.get("iteration", 0) >= at_least and "train_loss" in m for m in read_metrics(run_dir)):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError("the run never got going")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The bare `python -m tuning_fork`, run once: the demo every user starts with."""
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    proc = run_cli(f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc
