"""Data-parallel training: `mlx.launch -n 2 --backend ring` on this machine's CPU trains one run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import make_data, read_metrics, run_cli

pytestmark = pytest.mark.slow

LAUNCH = str(Path(sys.executable).parent / "mlx.launch")
ARGS = ("data=jsonl", "schedule.batch_size=4", "schedule.epochs=6", "schedule.learning_rate=1e-3",
        "adapter.rank=16", "adapter.alpha=32", "schedule.steps_per_report=2", "schedule.steps_per_eval=8")


def launch(n, *args, cwd):
    return subprocess.run([LAUNCH, "-n", str(n), "--backend", "ring", "--", sys.executable, "-m", "tuning_fork",
                           *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_two_ring_processes_train_one_run(tmp_path):
    folder = make_data(tmp_path / "d", n_train=30, n_valid=8, n_test=4)
    one = run_cli(*ARGS, f"data.path={folder}", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    # no hydra.run.dir: both ranks must agree on Hydra's timestamped folder, and only rank 0 writes
    two = launch(2, *ARGS, f"data.path={folder}", cwd=tmp_path)
    assert two.returncode == 0, (two.stdout[-2000:], two.stderr[-3000:])
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    assert not (tmp_path / ".hydra").exists() and not list(tmp_path.glob("*.log"))

    got, want = read_metrics(run), read_metrics(tmp_path / "one")
    train = [m["iteration"] for m in got if "train_loss" in m]
    val = [m["iteration"] for m in got if "val_loss" in m]
    assert train == sorted(set(train)) and val == sorted(set(val))  # each report once
    assert train == [m["iteration"] for m in want if "train_loss" in m]
    assert val == [m["iteration"] for m in want if "val_loss" in m]
    # token counts are global: the two ranks together trained exactly the records one process did
    assert [m["trained_tokens"] for m in got if "train_loss" in m] == \
        [m["trained_tokens"] for m in want if "train_loss" in m]
    final = [m["val_loss"] for m in got if "val_loss" in m]
    single = [m["val_loss"] for m in want if "val_loss" in m]
    assert final[0] == pytest.approx(single[0], rel=1e-4)  # the same model before training
    assert final[-1] == pytest.approx(single[-1], rel=0.10), (final, single)
    assert final[-1] < final[0] / 2
    results = json.loads((run / "results.json").read_text())
    assert results["iters"] == json.loads((tmp_path / "one" / "results.json").read_text())["iters"]
    assert (run / "adapters" / "adapters.safetensors").exists()


def test_a_global_batch_that_does_not_split_is_one_clear_line(tmp_path):
    folder = make_data(tmp_path / "d")
    proc = launch(2, "data=jsonl", f"data.path={folder}", "schedule.batch_size=3",
                  f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert "exited with code 2" in proc.stderr  # (mlx.launch itself exits 0 whatever its ranks do)
    assert "Traceback" not in proc.stderr
    assert "schedule.batch_size=3 is the global batch" in proc.stderr and "multiple of 2" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tuning_fork: error")]
    assert all(line.startswith(("tuning_fork: error: ", "tuning_fork: error (rank 1): ")) for line in errors)
    assert sum(line.startswith("tuning_fork: error: ") for line in errors) <= 1, errors  # rank 0's, if any


def test_a_two_process_run_stopped_by_sigterm_resumes_exactly(tmp_path):
    """As a scheduler stops a job: SIGTERM to every process. Both ranks stop at the same step, rank 0
    writes the checkpoint, and `resume=true` under mlx.launch ends where an unstopped run ends."""
    import os
    import signal
    import time

    from .conftest import adapters, max_difference, reports, wait_for_iteration

    folder = make_data(tmp_path / "d", n_train=16, n_valid=8)
    args = ("data=jsonl", f"data.path={folder}", "schedule.batch_size=4", "schedule.epochs=4",
            "schedule.learning_rate=1e-3", "schedule.steps_per_report=1", "schedule.steps_per_eval=20",
            "schedule.save_every=3", "adapter.dropout=0.1")
    whole = launch(2, *args, f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path)
    assert whole.returncode == 0 and (tmp_path / "whole" / "results.json").exists(), whole.stderr[-3000:]

    run = tmp_path / "run"
    proc = subprocess.Popen([LAUNCH, "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "tuning_fork",
                             *args, f"hydra.run.dir={run}"], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_iteration(run, 4, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    for _ in range(600):  # the ranks outlive the launcher by the time a checkpoint takes
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    assert list((run / "checkpoints").glob("[0-9]*")) and not (run / "results.json").exists()

    resumed = launch(2, *args, f"hydra.run.dir={run}", "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0 and "resumed at iteration" in resumed.stdout, resumed.stderr[-3000:]
    got, want = reports(run), reports(tmp_path / "whole")
    assert [m["iteration"] for m in got] == [m["iteration"] for m in want]
    for a, b in zip(got, want):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a, b)
    assert max_difference(adapters(run), adapters(tmp_path / "whole")) < 1e-5


def test_dpo_under_two_ring_processes(tmp_path):
    """Preference pairs split over two ranks: the reference is the starting policy on every rank (the
    first validation is exactly log 2), and the ranks train one run that equals a single process's."""
    import math

    from .conftest import pairs_data

    folder = pairs_data(tmp_path / "d")
    args = ("objective=dpo", "data=jsonl", f"data.path={folder}", "debug=fast", "schedule.learning_rate=1e-3")
    one = run_cli(*args, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch(2, *args, f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path)
    assert two.returncode == 0 and (tmp_path / "two" / "results.json").exists(), two.stderr[-3000:]
    got, want = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    vals = [m["val_loss"] for m in got if "val_loss" in m]
    assert vals[0] == pytest.approx(math.log(2), rel=1e-5)
    assert [m["iteration"] for m in got] == [m["iteration"] for m in want]
    assert vals[-1] == pytest.approx([m["val_loss"] for m in want if "val_loss" in m][-1], rel=0.05)
    assert (tmp_path / "two" / "reference" / "logps.npz").exists()


def test_grpo_under_two_ring_processes(tmp_path):
    """Each rank samples the groups of its share of the prompts; the ranks report one run."""
    from .conftest import write_jsonl

    write_jsonl(tmp_path / "d" / "train.jsonl", [{"prompt": f"Say {i}.", "answer": str(i)} for i in range(8)])
    write_jsonl(tmp_path / "d" / "valid.jsonl", [{"prompt": f"Say {i}.", "answer": str(i)} for i in range(4)])
    two = launch(2, "objective=grpo", "data=jsonl", f"data.path={tmp_path / 'd'}", "debug=fast",
                 "objective.group_size=2", "objective.max_tokens=8",
                 "+objective.rewards=[{_target_: tuning_fork.rewards.length, target: 10}]",
                 f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path)
    assert two.returncode == 0 and (tmp_path / "two" / "results.json").exists(), two.stderr[-3000:]
    got = read_metrics(tmp_path / "two")
    assert [m["iteration"] for m in got if "train_loss" in m] == [3, 6]
    assert all(0 <= m["val_reward_mean"] <= 1 for m in got if "val_reward_mean" in m)


REDUCE = """
import mlx.core as mx
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten
from tuning_fork.step import reduce_gradients

rank = mx.distributed.init().rank()
mx.random.seed(rank)  # each rank its own gradients, in a LoRA-like tree of float32 and bfloat16 arrays
grad = {"layers": [{"a": mx.random.normal((64, 8)), "b": mx.random.normal((8, 48)),
                    "h": mx.random.normal((33,)).astype(mx.bfloat16)} for _ in range(6)]}
want = dict(tree_flatten(average_gradients(grad)))
calls, all_sum = [], mx.distributed.all_sum
mx.distributed.all_sum = lambda x, **kw: calls.append(x.size) or all_sum(x, **kw)
counts = []
for bucket_mb in (0.001, 0.004, 8.0):  # an array a bucket (the small ones together), a few, one per dtype
    calls.clear()
    got = dict(tree_flatten(reduce_gradients(grad, bucket_mb)))
    counts.append(len(calls))
    assert list(got) == list(want)
    assert all(got[k].dtype == want[k].dtype and mx.array_equal(got[k], want[k]).item() for k in want), bucket_mb
assert counts[0] == 13 and 2 < counts[1] < 13 and counts[2] == 2, counts  # 12 float32 arrays, 6 small bfloat16
print("EQUAL", rank)
"""


def test_bucketed_last_layer_first_reduction_equals_the_plain_all_reduce(tmp_path):
    """schedule.reduce_bucket_mb: gradients averaged in buckets, last layer first (so that the reduction can
    overlap the backward pass), equal bit for bit to mlx's average_gradients on two ring processes."""
    script = tmp_path / "reduce.py"
    script.write_text(REDUCE)
    proc = subprocess.run([LAUNCH, "-n", "2", "--backend", "ring", "--", sys.executable, str(script)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EQUAL 0" in proc.stdout and "EQUAL 1" in proc.stdout, proc.stdout


FLAT = """
import sys

sys.path.insert(0, sys.argv[1])  # the checkout, for tests.test_step
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from tests.test_step import tiny_lora_model
from tuning_fork.step import make_step, per_parameter_state, use_flat_update

group = mx.distributed.init()
rng = np.random.default_rng(group.rank())  # each rank its own batches
batches = [mx.array(rng.integers(0, 100, (4, 17))) for _ in range(4)]


def train(flat):
    model, opt = tiny_lora_model(mixed=True), optim.AdamW(learning_rate=1e-2, weight_decay=0.1)
    if flat is None:
        assert use_flat_update(model, opt) and not use_flat_update(model, optim.Adafactor())
    step, state = make_step(model, opt, accumulation=2, flat=flat)
    grad = None
    for n, tokens in enumerate(batches, 1):
        value, _, _, grad = step((tokens, mx.ones((4, 16), dtype=mx.bool_)), grad, n % 2 == 0)
        mx.eval(state, value, grad)
    return dict(tree_flatten(model.trainable_parameters())), dict(tree_flatten(per_parameter_state(model, opt)))


(weights, states), (flat_weights, flat_states) = train(False), train(None)
assert list(flat_weights) == list(weights) and list(flat_states) == list(states)
assert all(mx.array_equal(flat_weights[k], weights[k]).item() for k in weights)
assert all(mx.array_equal(flat_states[k], states[k]).item() for k in states)
mine = np.array(weights["model.layers.0.self_attn.q_proj.lora_b"].astype(mx.float32))
both = np.array(mx.distributed.all_sum(mx.array(mine)))
assert np.array_equal(both, 2 * mine) and np.abs(mine).max() > 0  # the ranks agree, on trained weights
print("EQUAL", group.rank())
"""


def test_the_flat_update_equals_average_gradients_on_two_ring_processes(tmp_path):
    """With several ranks make_step averages the concatenated gradients in one all-reduce and updates them at
    once (step.flat_update): the same weights and optimizer state, bit for bit, as mlx's average_gradients and
    the per-parameter update, and the ranks stay equal."""
    script = tmp_path / "flat.py"
    script.write_text(FLAT)
    root = Path(__file__).parent.parent
    proc = subprocess.run([LAUNCH, "-n", "2", "--backend", "ring", "--", sys.executable, str(script), str(root)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EQUAL 0" in proc.stdout and "EQUAL 1" in proc.stdout, (proc.stdout, proc.stderr[-3000:])
