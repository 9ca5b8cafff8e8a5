"""Mixtures (data=mix): each epoch's share of every source, the draw's determinism (resume), per-source
validation, the plan's count, summary.json and the errors."""

import json
import math
import signal
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuning_fork.data import Batcher
from tuning_fork.errors import ConfigError
from tuning_fork.mixture import Sampler, epoch_counts

from .conftest import assert_resumed_exactly, make_data, one_line_error, read_metrics, run_cli, write_jsonl

# ------------------------------------------------------------------------------------------- the draw

sources = st.lists(st.tuples(st.integers(1, 40), st.one_of(st.none(), st.floats(0.1, 10)),
                             st.one_of(st.none(), st.floats(0.25, 3))), min_size=1, max_size=4)


def offsets_of(sizes):
    out, at = [], 0
    for k, n in enumerate(sizes):
        out.append((f"s{k}", at, at + n))
        at += n
    return out


@settings(max_examples=150, deadline=None)
@given(sources, st.one_of(st.none(), st.integers(1, 200)), st.integers(0, 2**31 - 1), st.integers(1, 12))
def test_every_epoch_holds_each_sources_share_and_over_many_epochs_every_record_comes_up_evenly(
        spec, records_per_epoch, seed, n_epochs):
    sizes = [n for n, _, _ in spec]
    weights = [w for _, w, _ in spec]
    epochs = [None if w is not None else e for _, w, e in spec]  # weight wins where both were drawn
    try:
        counts = epoch_counts(sizes, weights, epochs, records_per_epoch)
    except ConfigError:  # records_per_epoch too small for the sources' epochs: refused, never silently cut
        fixed = sum(round((e or 1) * n) for n, w, e in zip(sizes, weights, epochs) if w is None)
        weighted = sum(w is not None for w in weights)
        assert records_per_epoch is not None and (
            records_per_epoch < fixed + weighted or (not weighted and records_per_epoch != fixed))
        return
    total = records_per_epoch if records_per_epoch is not None else \
        sum(round((e or 1) * n) if w is None else n for n, w, e in zip(sizes, weights, epochs))
    assert sum(counts) == total
    rest = total - sum(c for c, w in zip(counts, weights) if w is None)
    scale = sum(w for w in weights if w is not None)
    for n, w, e, c in zip(sizes, weights, epochs, counts):
        if w is None:
            assert c == round((e or 1) * n)  # whole passes (and part of one)
        else:
            assert abs(c - rest * w / scale) < 1 or c == 1  # its share, to the record (at least one)
    offsets = offsets_of(sizes)
    draw = Sampler(offsets, weights, epochs, records_per_epoch, seed)
    seen = Counter()
    for epoch in range(n_epochs):
        picks = draw(epoch)
        assert picks == draw(epoch)  # a function of seed and epoch alone: a resumed run draws the same
        for (name, lo, hi), c in zip(offsets, counts):
            assert sum(lo <= i < hi for i in picks) == c
        seen.update(picks)
    for (name, lo, hi), c in zip(offsets, counts):  # the first T draws of a source: whole passes, then distinct
        whole = n_epochs * c // (hi - lo)
        assert all(whole <= seen[i] <= whole + 1 for i in range(lo, hi))


def test_a_source_larger_than_its_share_shows_every_record_before_any_repeats():
    draw = Sampler([("big", 0, 100), ("small", 100, 110)], [1, 1], [None, None], 20, seed=3)
    first = [i for e in range(10) for i in draw(e) if i < 100]
    assert sorted(first) == list(range(100))  # 10 epochs x 10 records: each record once
    assert draw(0) != draw(1)


def test_the_batcher_trains_the_mixtures_draw_and_resumes_at_any_step():
    records = [([1] * (2 + i % 7), ((0, 2 + i % 7),)) for i in range(30)]
    b = Batcher(4, 64, seed=5)
    b.sample = Sampler([("a", 0, 20), ("b", 20, 30)], [3, 1], [None, None], 16, seed=5)
    assert b.rows_per_epoch(records) == 16
    whole = [np.array(t).tolist() for t, _ in (next(it) for it in [b.train(records)] * 12)]
    resumed = b.train(records, start=7)
    assert [np.array(next(resumed)[0]).tolist() for _ in range(5)] == whole[7:]


# ----------------------------------------------------------------------------------------- the CLI


def mix_data(tmp_path):
    """Two sources with different fields: chat records, and question/answer records mapped to prompt/completion."""
    a = make_data(tmp_path / "a", n_train=24, n_valid=11)
    b = tmp_path / "b"
    write_jsonl(b / "train.jsonl", [{"question": f"Spell {w}.", "answer": " ".join(w)} for w in
                                    ("cat", "dog", "bird", "fish", "frog", "lion", "bear", "wolf")])
    write_jsonl(b / "valid.jsonl", [{"question": f"Spell {w}.", "answer": " ".join(w)} for w in ("owl", "eel", "ant")])
    return [f"data.sources.a.path={a}", "data.sources.a.weight=3",
            f"data.sources.b.path={b}", "data.sources.b.weight=1", "data.sources.b.prompt_feature=question",
            "data.sources.b.completion_feature=answer", "data.sources.b.prompt_format=chatml"]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mix")
    args = ["data=mix", *mix_data(tmp), "data.records_per_epoch=16", "schedule.batch_size=4", "schedule.epochs=2",
            "schedule.steps_per_eval=4", "schedule.steps_per_report=2", "data.mask_prompt=true"]
    run_dir = tmp / "run"
    proc = run_cli(*args, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return args, run_dir, proc


def test_a_mixture_trains_its_epochs_and_validates_each_source(mixed_run):
    args, run_dir, proc = mixed_run
    assert "mix · a 12 of 24 + b 4 of 8 = 16 records per epoch" in proc.stdout
    result = json.loads((run_dir / "results.json").read_text())
    assert result["iters"] == 8  # 2 epochs of 16 records in batches of 4
    vals = [m for m in read_metrics(run_dir) if "val_loss/a" in m]
    assert len(vals) >= 3 and all("val_loss/b" in m for m in vals)
    for m in vals:  # the overall loss is the token-weighted mean of the sources'
        lo, hi = sorted((m["val_loss/a"], m["val_loss/b"]))
        assert lo - 1e-6 <= m["val_loss"] <= hi + 1e-6
    assert vals[-1]["val_loss/a"] < vals[0]["val_loss/a"]
    assert "best_val_loss/b" in result


def test_the_plan_counts_the_mixture_and_summary_writes_each_source(mixed_run, tmp_path):
    args, _, _ = mixed_run
    proc = run_cli(*args, "--cfg", "job", "--resolve")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "iters: 8\n" in proc.stdout  # ceil(16 / 4) x 2 epochs, from the files, before anything loads
    proc = run_cli(*args, "summary=true", f"hydra.run.dir={tmp_path / 'sum'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "sum" / "summary.json").read_text())
    train = out["splits"]["train"]
    assert train["records_per_epoch"] == 16 and train["records"] == 32
    assert {k: v["records_per_epoch"] for k, v in train["sources"].items()} == {"a": 12, "b": 4}
    assert out["splits"]["valid"]["sources"]["b"]["records"] == 3
    assert out["plan"]["iters"] == 8 and out["plan"]["records_per_epoch"] == 16
    assert out["mlx_lm_command"] is None


def test_a_sweep_can_optimize_one_sources_loss(mixed_run, tmp_path):
    args, _, _ = mixed_run
    proc = run_cli(*args, "optimized_metric=best_val_loss/b", "schedule.epochs=0.5", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli(*args, "optimized_metric=val_loss/c", f"hydra.run.dir={tmp_path / 'r2'}")
    one_line_error(proc, "optimized_metric='val_loss/c'", "val_loss/b")


@pytest.mark.slow
def test_a_stopped_mixture_resumes_exactly(tmp_path):
    from .test_resume import stop_midway

    args = ["data=mix", *mix_data(tmp_path), "data.records_per_epoch=10", "schedule.batch_size=2", "schedule.iters=60",
            "schedule.epochs=null", "schedule.steps_per_report=1", "schedule.steps_per_eval=10",
            "schedule.save_every=5", "adapter.dropout=0.1"]
    whole = tmp_path / "whole"
    assert run_cli(*args, f"hydra.run.dir={whole}").returncode == 0
    run_dir = tmp_path / "run"
    code, err = stop_midway(run_dir, 12, *args)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    proc = run_cli(*args, f"hydra.run.dir={run_dir}", "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_resumed_exactly(run_dir, whole)


@pytest.mark.parametrize("extra, needles", [
    (["data.sources.b.epochs=2"], ["data.sources.b", "weight and epochs both set"]),
    (["data.records_per_epoch=1"], ["data.records_per_epoch=1", "at least 2"]),
    (["data.sources.b.wieght=2"], ["data.sources.b.wieght", "no such setting"]),
    (["data.sources.c.path=/nowhere/at/all"], ["data.sources.c", "/nowhere/at/all"]),
])
def test_mixture_mistakes_are_one_line_errors(tmp_path, extra, needles):
    proc = run_cli("data=mix", *mix_data(tmp_path), *extra, "schedule.epochs=1", f"hydra.run.dir={tmp_path / 'r'}")
    one_line_error(proc, *needles)
    assert not (tmp_path / "r" / "adapters").exists()


def test_no_sources_is_a_one_line_error(tmp_path):
    one_line_error(run_cli("data=mix", f"hydra.run.dir={tmp_path / 'r'}"), "data=mix needs sources")


def test_the_built_in_mixture_runs(tmp_path):
    proc = run_cli("data=demo_mix", "debug=fast", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "chat 90 of 87 + text 30 of 34 = 120 records per epoch" in proc.stdout
    assert math.isfinite(json.loads((tmp_path / "r" / "results.json").read_text())["best_val_loss/text"])
