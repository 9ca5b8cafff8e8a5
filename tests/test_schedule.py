"""The epoch arithmetic: worked values, properties for any input, the resolver in the CLI, and summary=true."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuning_fork import data, schedule
from tuning_fork.errors import ConfigError

from .conftest import make_data, run_cli, write_jsonl

DEFAULTS = dict(batch_size=4, epochs=None, evals_per_epoch=None, eval_proportion_of_total=0.25,
                reporting_interval_proportion=0.01, validation_interval_proportion=0.2,
                validations_per_train_item=0.5, saves_per_epoch=2, adapter_save_interval_proportion=0.1,
                eval_every=None, report_every=None, checkpoint_every=None)


def sched(**kw):
    return {**DEFAULTS, **kw}


def test_worked_values():
    p = schedule.plan(37, 9, sched(batch_size=4, epochs=2))
    assert (p["steps_per_epoch"], p["iters"], p["steps_per_eval"], p["steps_per_report"], p["save_every"],
            p["val_batches"]) == (10, 20, 4, 1, 5, 2)
    p = schedule.plan(37, 9, sched(batch_size=4, epochs=2, evals_per_epoch=4, eval_proportion_of_total=0.5))
    assert (p["steps_per_eval"], p["val_batches"]) == (2, 1)


def test_neither_epochs_nor_iters_is_one_epoch_and_epochs_win():
    assert schedule.plan(37, 9, sched())["iters"] == 10
    assert schedule.plan(37, 9, sched(), iters=7)["iters"] == 7
    assert schedule.plan(37, 9, sched(epochs=3), iters=7)["iters"] == 30


def test_original_crashes_are_gone():
    # evals_per_epoch=1 divided by zero in mlx-tuning-fork; more evals/saves than batches gave interval 0
    p = schedule.plan(10, 4, sched(evals_per_epoch=1, epochs=1))
    assert p["steps_per_eval"] == 3
    p = schedule.plan(10, 4, sched(evals_per_epoch=50, saves_per_epoch=50, epochs=1))
    assert p["steps_per_eval"] == 1 and p["save_every"] == 1


def test_units():
    p = schedule.plan(40, 8, sched(epochs=2, eval_every="0.5ep", report_every="3it", checkpoint_every="7"))
    assert (p["steps_per_eval"], p["steps_per_report"], p["save_every"]) == (5, 3, 7)
    with pytest.raises(ConfigError, match="eval_every"):
        schedule.plan(40, 8, sched(eval_every="half an epoch"))


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 5000), v=st.integers(1, 2000), b=st.integers(1, 64),
       epochs=st.one_of(st.none(), st.floats(0.01, 20)), evals=st.one_of(st.none(), st.floats(0.1, 100)),
       saves=st.one_of(st.none(), st.floats(0.1, 100)), prop=st.floats(0.001, 1),
       vprop=st.floats(0.001, 1), per_item=st.floats(0.001, 10))
def test_every_interval_is_at_least_one_and_within_the_run(n, v, b, epochs, evals, saves, prop, vprop, per_item):
    p = schedule.plan(n, v, sched(batch_size=b, epochs=epochs, evals_per_epoch=evals, saves_per_epoch=saves,
                                  reporting_interval_proportion=prop, eval_proportion_of_total=vprop,
                                  validation_interval_proportion=vprop, validations_per_train_item=per_item))
    for key in ("steps_per_eval", "steps_per_report", "save_every"):
        assert 1 <= p[key] <= p["iters"], (key, p)
    assert 1 <= p["val_batches"] <= math.ceil(v / b)
    assert p["steps_per_epoch"] == math.ceil(n / b)


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=400), b=st.integers(1, 32),
       seed=st.integers(0, 2**16), epoch=st.integers(0, 5))
def test_the_batcher_sees_every_record_once_per_epoch_in_E_batches(lengths, b, seed, epoch):
    batches = data.batch_order(lengths, b, seed, epoch)
    assert len(batches) == schedule.plan(len(lengths), 1, sched(batch_size=b))["steps_per_epoch"]
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches == data.batch_order(lengths, b, seed, epoch)  # deterministic for a seed


def test_batches_group_similar_lengths():
    lengths = [5] * 90 + [400] * 10
    batches = data.batch_order(lengths, 8, seed=0, epoch=0)
    mixed = sum(len({lengths[i] for i in batch}) > 1 for batch in batches)
    assert mixed <= 2  # random batching would mix long and short in most of the 13 batches


def test_resolve_on_the_command_line_shows_the_plan(tmp_path):
    folder = tmp_path / "d"
    write_jsonl(folder / "train.jsonl", [{"text": f"t{i}"} for i in range(37)])
    write_jsonl(folder / "valid.jsonl", [{"text": f"v{i}"} for i in range(9)])
    proc = run_cli("data=jsonl", f"data.path={folder}", "schedule.batch_size=4", "schedule.epochs=2",
                   "--cfg", "job", "--resolve")
    assert proc.returncode == 0, proc.stderr
    for line in ("iters: 20", "steps_per_eval: 4", "steps_per_report: 1", "save_every: 5", "val_batches: 2"):
        assert f"  {line}\n" in proc.stdout
    proc = run_cli("data=jsonl", f"data.path={folder}", "schedule.batch_size=4", "schedule.epochs=2",
                   "schedule.steps_per_eval=50", "--cfg", "job", "--resolve")
    assert "  steps_per_eval: 50\n" in proc.stdout  # an explicit value is kept


@pytest.mark.slow
def test_summary_prints_statistics_and_plan_and_trains_nothing(tmp_path):
    folder = make_data(tmp_path / "d", n_train=37, n_valid=9)
    run = tmp_path / "run"
    proc = run_cli("summary=true", "data=jsonl", f"data.path={folder}", "schedule.batch_size=4",
                   "schedule.epochs=2", "data.mask_prompt=true", "schedule.lr_schedule.warmup_proportion=0.1",
                   f"hydra.run.dir={run}", env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "train" in out and "valid" in out and "37" in out and "pad (ours)" in out
    assert "iterations" in out and "20" in out and "mlx_lm.lora --train" in out and "--iters 20" in out
    assert not (run / "adapters").exists() and not (run / "metrics.jsonl").exists()
    summary = json.loads((run / "summary.json").read_text())  # the same figures, for scripts
    train = summary["splits"]["train"]
    assert train["records"] == 37 and 0 < train["target_tokens"] < train["tokens"] and train["too_long"] == 0
    assert summary["plan"]["iters"] == 20 and summary["plan"]["warmup"] == 2 and "padding" in train


@pytest.mark.slow
def test_a_run_follows_the_derived_plan(tmp_path):
    from tuning_fork.train import train

    from .conftest import compose_cfg, read_metrics

    folder = make_data(tmp_path / "d", n_train=18, n_valid=6)
    cfg = compose_cfg("data=jsonl", f"data.path={folder}", f"output_dir={tmp_path / 'run'}",
                      "schedule.batch_size=4", "schedule.epochs=2", "schedule.evals_per_epoch=2")
    result = train(cfg)
    assert result["iters"] == 10  # E = ceil(18 / 4) = 5: the last partial batch trains
    vals = [m["iteration"] for m in read_metrics(tmp_path / "run") if "val_loss" in m]
    assert vals[0] == 0 and vals[-1] == 10
    saved = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    assert "iters: 10" in saved and "steps_per_eval: 2" in saved


def test_summary_with_packing_plans_in_packed_rows(tmp_path):
    from tuning_fork.summary import summarize

    from .conftest import compose_cfg

    folder = make_data(tmp_path / "d", n_train=37, n_valid=9)
    cfg = compose_cfg("summary=true", "data=jsonl", f"data.path={folder}", "schedule.batch_size=2",
                      "schedule.epochs=2", "data.packing=true", "data.max_seq_length=256")
    out = summarize(cfg)
    train = out["splits"]["train"]
    assert train["rows"] < 37 and train["padding"] < 0.2  # ~6 records a row, little padding
    assert out["plan"]["packed_rows_per_epoch"] == train["rows"]
    assert out["plan"]["iters"] == 2 * math.ceil(train["rows"] / 2)


def test_warmup_and_decay_in_proportions_resolve_into_updates(tmp_path):
    """mlx-tuning-fork's dynamic learning: warmup as a share of the run, then cosine or linear decay to a
    floor. The resolver turns the share into updates (`--cfg job --resolve` shows it); an explicit warmup wins."""
    from omegaconf import OmegaConf

    from tuning_fork.step import build_lr_schedule

    from .conftest import compose_cfg

    folder = make_data(tmp_path / "d", n_train=40)  # E = 10 batches of 4
    base = ("data=jsonl", f"data.path={folder}", "schedule=default", "schedule.epochs=4",
            "schedule.lr_schedule.warmup_proportion=0.1")
    cfg = compose_cfg(*base, "schedule.grad_accumulation_steps=2")
    assert OmegaConf.to_container(cfg, resolve=True)["schedule"]["lr_schedule"]["warmup"] == 2  # 10% of 20 updates
    cfg = compose_cfg(*base, "schedule.lr_schedule.warmup=7")
    assert cfg.schedule.lr_schedule.warmup == 7 and schedule.run_plan(cfg, 40, 8)["warmup"] == 7

    peak, floor = 1e-3, 1e-4
    for decay, middle in (("cosine", floor + (peak - floor) / 2), ("linear", floor + (peak - floor) / 2)):
        sc = OmegaConf.create({"decay": decay, "name": None, "arguments": [], "min_lr": None, "min_lr_ratio": 0.1,
                               "warmup_init": 0.0})
        lr = build_lr_schedule(peak, sc, updates=40, warmup=4)
        assert float(lr(0)) == 0.0 and float(lr(4)) == pytest.approx(peak)
        assert float(lr(4 + 18)) == pytest.approx(middle, rel=1e-3), decay  # halfway through the decay
        assert float(lr(40)) == pytest.approx(floor, rel=1e-3)


def test_a_warmup_longer_than_the_run_is_one_line(tmp_path):
    from .conftest import compose_cfg

    folder = make_data(tmp_path / "d", n_train=40)
    cfg = compose_cfg("data=jsonl", f"data.path={folder}", "schedule=default", "schedule.epochs=1",
                      "schedule.lr_schedule.warmup=50")
    with pytest.raises(ConfigError, match=r"warmup=50 updates is longer than the run \(10 optimizer updates\)"):
        schedule.run_plan(cfg, 40, 8)
    cfg = compose_cfg("data=jsonl", f"data.path={folder}", "schedule.lr_schedule.warmup_proportion=1.5")
    with pytest.raises(ConfigError, match="warmup_proportion=1.5"):
        schedule.run_plan(cfg, 40, 8)


@pytest.mark.parametrize("overrides,message", [
    (("schedule.lr_schedule.decay=cosine", "schedule.lr_schedule.name=cosine_decay"), "decay=cosine and name=cosine_decay both set"),
    (("schedule.lr_schedule.decay=cosine", "schedule.lr_schedule.min_lr=1e-6", "schedule.lr_schedule.min_lr_ratio=0.1"),
     "min_lr and min_lr_ratio both set"),
    (("schedule.lr_schedule.min_lr=1e-6",), "without a decay has no effect"),
    (("schedule.lr_schedule.decay=linear", "schedule.lr_schedule.min_lr_ratio=2"), "min_lr_ratio=2"),
])
def test_learning_rate_settings_that_do_not_go_together_are_one_line_before_any_work(overrides, message):
    from tuning_fork import config

    from .conftest import compose_cfg

    with pytest.raises(ConfigError, match=message) as e:
        config.check(compose_cfg(*overrides))
    assert "\n" not in str(e.value)
