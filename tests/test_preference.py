"""Preference tuning: each objective's loss against a computation by hand, pair data and its errors, the
reference of the starting policy, resume, summary, sweeps and the sft -> dpo pipeline."""

import json
import math
import os
import signal

import numpy as np
import pytest

from tuning_fork.errors import TuningForkError

from .conftest import compose_cfg, pairs_data, read_metrics, run_cli, write_jsonl

FAST = ("data=jsonl", "debug=fast", "schedule.learning_rate=1e-3")


def by_hand(model, tokens, mask):
    """Per row: the sum and count of the target tokens' log-probabilities, from the logits, in numpy."""
    import mlx.core as mx

    logits = np.array(model(tokens[:, :-1]).astype(mx.float32), dtype=np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets, m = np.array(tokens[:, 1:]), np.array(mask, dtype=np.float64)
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return (picked * m).sum(-1), m.sum(-1)


def logsig(x):
    return -np.logaddexp(0, -x)


@pytest.mark.parametrize("objective,extra", [
    ("dpo", ["objective.loss_type=sigmoid", "objective.label_smoothing=0.2"]),
    ("dpo", ["objective.loss_type=ipo", "objective.beta=0.5"]),
    ("dpo", ["objective.loss_type=hinge"]),
    ("orpo", []), ("simpo", ["objective.label_smoothing=0.1"])])
def test_each_loss_matches_the_papers_formula_computed_by_hand(tmp_path, objective, extra):
    from mlx_lm import load

    from tuning_fork import data, models
    from tuning_fork.objectives import build

    folder = pairs_data(tmp_path / "d", n_train=4)
    cfg = compose_cfg(*FAST, f"data.path={folder}", f"objective={objective}", *extra)
    model, tokenizer = load(models.resolve("tiny"))
    o = build(cfg)
    pairs = o.encode(data.load_splits(cfg.data), tokenizer)["train"][:3]
    ref_c, ref_r = np.array([-40.0, -35.5, -50.25]), np.array([-41.0, -30.0, -49.0])
    for p, c, r in zip(pairs, ref_c, ref_r):
        p[4], p[5] = c, r
    batch = data.collate_pairs(pairs, 256)
    loss, weight, aux = o.pair_loss(model, *batch)
    sums, counts = by_hand(model, batch[0], batch[1])
    pc, pr, nc, nr = sums[:3], sums[3:], counts[:3], counts[3:]
    b, eps = cfg.objective.beta, cfg.objective.label_smoothing
    if objective == "dpo":
        z = (pc - pr) - (ref_c - ref_r)
        losses = {"sigmoid": -(1 - eps) * logsig(b * z) - eps * logsig(-b * z), "ipo": (z - 1 / (2 * b)) ** 2,
                  "hinge": np.maximum(0, 1 - b * z)}[str(cfg.objective.loss_type)]
        want, rc, rr = losses.mean(), b * (pc - ref_c), b * (pr - ref_r)
    else:
        c, r = pc / nc, pr / nr
        rc, rr = b * c, b * r
        if objective == "simpo":
            z = c - r - cfg.objective.gamma_beta_ratio
            want = (-(1 - eps) * logsig(b * z) - eps * logsig(-b * z)).mean()
        else:
            odds = (c - r) - (np.log1p(-np.exp(c)) - np.log1p(-np.exp(r)))
            want = -pc.sum() / nc.sum() - b * logsig(odds).mean()
    assert loss.item() == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert weight.item() == 3 and aux["tokens"].item() == counts.sum()
    assert aux["chosen_reward"].item() == pytest.approx(rc.mean(), rel=1e-4, abs=1e-5)
    assert aux["reward_margin"].item() == pytest.approx((rc - rr).mean(), rel=1e-4, abs=1e-5)
    assert aux["reward_accuracy"].item() == pytest.approx((rc > rr).mean())


@pytest.mark.slow
def test_dpo_trains_from_its_starting_policy_and_a_resume_reads_the_stored_reference(tmp_path):
    """At iteration 0 the policy is the reference: loss log 2, zero rewards. The reference is stored; a run
    interrupted and resumed reads it and ends where an uninterrupted run ends."""
    from tuning_fork.checkpoint import Interrupted
    from tuning_fork.tracking import Hook
    from tuning_fork.train import train

    folder = pairs_data(tmp_path / "d", seen=True)
    args = (*FAST, f"data.path={folder}", "objective=dpo", "schedule.iters=16", "schedule.steps_per_eval=4",
            "schedule.save_every=4", "schedule.learning_rate=3e-3")
    whole = train(compose_cfg(*args, f"output_dir={tmp_path / 'whole'}"))
    first = [m for m in read_metrics(tmp_path / "whole") if "val_loss" in m][0]
    assert first["val_loss"] == pytest.approx(math.log(2), rel=1e-5) and first["val_reward_margin"] == 0
    assert (tmp_path / "whole" / "reference" / "logps.npz").exists()
    trains = [m for m in read_metrics(tmp_path / "whole") if "train_loss" in m]
    assert {"train_reward_accuracy", "train_chosen_logp", "train_rejected_reward"} <= set(trains[-1])
    assert whole["val_loss"] < math.log(2) and whole["val_reward_accuracy"] > 0.5  # it learned to prefer
    assert whole["best_val_reward_accuracy"] >= whole["val_reward_accuracy"]

    class SignalAt(Hook):
        def on_validation(self, run, info):
            if info["iteration"] == 8:
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(compose_cfg(*args, f"output_dir={tmp_path / 'run'}"), hooks=[SignalAt()])
    reference = tmp_path / "run" / "reference" / "logps.npz"
    stored, written = np.load(reference)["train_chosen"].copy(), reference.stat().st_mtime_ns
    resumed = train(compose_cfg(*args, f"output_dir={tmp_path / 'run'}", "resume=true"))
    assert np.array_equal(np.load(reference)["train_chosen"], stored)
    assert reference.stat().st_mtime_ns == written  # read back, not computed again
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-4)
    assert resumed["val_reward_margin"] == pytest.approx(whole["val_reward_margin"], rel=1e-3, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_orpo_and_simpo_train_on_chat_pairs_without_a_reference(tmp_path, objective):
    from tuning_fork.train import train

    folder = pairs_data(tmp_path / "d", chat=True, seen=True)
    result = train(compose_cfg(*FAST, f"data.path={folder}", f"objective={objective}", "schedule.iters=16",
                               "schedule.learning_rate=3e-3", f"output_dir={tmp_path / 'r'}"))
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < result["first_val_loss"]
    assert not (tmp_path / "r" / "reference").exists()


@pytest.mark.parametrize("record,needle", [
    ({"prompt": "q", "chosen": "a"}, "no known fields"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"chosen": "a", "rejected": "b"}, '"prompt" string'),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other q"}, {"role": "assistant", "content": "b"}]}, "shared prompt"),
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q2"}]}, "assistant"),
])
def test_bad_pairs_are_one_line_with_file_and_line(tmp_path, record, needle):
    from tuning_fork.train import train

    folder = pairs_data(tmp_path / "d")
    records = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
    records[2] = record
    write_jsonl(folder / "train.jsonl", records)
    with pytest.raises(TuningForkError) as e:
        train(compose_cfg(*FAST, f"data.path={folder}", "objective=dpo", f"output_dir={tmp_path / 'r'}"))
    assert "train.jsonl:3" in str(e.value) and needle in str(e.value)


def test_pairs_need_a_preference_objective_and_no_packing(tmp_path):
    from tuning_fork.train import train

    folder = pairs_data(tmp_path / "d")
    with pytest.raises(TuningForkError, match="objective=dpo, orpo or simpo"):
        train(compose_cfg(*FAST, f"data.path={folder}", f"output_dir={tmp_path / 'a'}"))
    from .conftest import make_data

    sft = make_data(tmp_path / "sft")
    with pytest.raises(TuningForkError, match="needs pairs"):
        train(compose_cfg(*FAST, f"data.path={sft}", "objective=dpo", f"output_dir={tmp_path / 'b'}"))
    with pytest.raises(TuningForkError, match="pairs are not packed"):
        train(compose_cfg(*FAST, f"data.path={folder}", "objective=dpo", "data.packing=true",
                          f"output_dir={tmp_path / 'c'}"))


@pytest.mark.slow
def test_the_sft_dpo_pipeline_summary_and_a_sweep_over_beta(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("pipeline=sft_dpo", f"hydra.run.dir={run}", "schedule.epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dpo = yaml_load(run / "dpo" / ".hydra" / "config.yaml")
    assert dpo["objective"]["name"] == "dpo" and dpo["init_from"] == str(run / "sft")
    assert (run / "dpo" / "reference" / "logps.npz").exists()
    assert "val_reward_accuracy" in json.loads((run / "dpo" / "results.json").read_text())
    summary = run_cli("objective=dpo", "data.path=preference", "summary=true", f"hydra.run.dir={tmp_path / 's'}")
    assert summary.returncode == 0 and "preference" in summary.stdout and "87" in summary.stdout
    assert "mlx_lm.lora" not in summary.stdout  # mlx-lm has no preference trainer: no "same run" to offer
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["splits"]["train"]["target_tokens"] > 0
    folder = pairs_data(tmp_path / "d")
    proc = run_cli("--multirun", "hydra/sweeper=tuning_fork_optuna", f"hydra.sweep.dir={tmp_path / 'sw'}",
                   *FAST, f"data.path={folder}", "objective=dpo", "hydra.sweeper.n_trials=2",
                   "hydra.sweeper.direction=maximize", "optimized_metric=best_val_reward_accuracy",
                   "objective.beta=interval(0.05,0.5)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import optuna

    trials = optuna.load_study(study_name="tuning_fork", storage=f"sqlite:///{tmp_path / 'sw' / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"] and all(0 <= t.value <= 1 for t in trials)


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_chunked_log_probabilities_match_the_plain_path_in_loss_and_gradients(tmp_path):
    """schedule.loss_chunk for pairs (a memory change): the same loss and gradients as all logits at once."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from tuning_fork import data, models
    from tuning_fork.objectives import build

    folder = pairs_data(tmp_path / "d", n_train=4)
    model, tokenizer = load(models.resolve("tiny"))
    model.freeze()
    models.attach(model, compose_cfg().adapter, compose_cfg().model)
    for _, p in tree_flatten(model.trainable_parameters()):  # nonzero adapters, so gradients flow everywhere
        p[...] = mx.random.normal(p.shape) * 0.05
    results = []
    for chunk in (None, 7):
        cfg = compose_cfg(*FAST, f"data.path={folder}", "objective=dpo", f"schedule.loss_chunk={chunk or 'null'}")
        o = build(cfg)
        pairs = o.encode(data.load_splits(cfg.data), tokenizer)["train"]
        for p in pairs:
            p[4], p[5] = -40.0, -41.0
        (value, _, _), grad = nn.value_and_grad(model, o.loss)(model, *data.collate_pairs(pairs, 256))
        results.append((value.item(), dict(tree_flatten(grad))))
    (plain, g1), (chunked, g2) = results
    assert chunked == pytest.approx(plain, rel=1e-5)
    for k in g1:
        assert mx.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-6).item(), k
