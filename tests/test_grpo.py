"""objective=grpo: the advantage and loss arithmetic against a hand computation, rewards (built in, TRL-style,
and their mistakes), a run through the CLI with its metrics and samples, and resume."""

import json
import math
import signal
import textwrap

import numpy as np
import pytest
from omegaconf import OmegaConf

from tuning_fork import rewards
from tuning_fork.errors import ConfigError, TuningForkError
from tuning_fork.objectives.grpo import advantage

from .conftest import assert_resumed_exactly, compose_cfg, one_line_error, read_metrics, run_cli, write_jsonl

# --------------------------------------------------------------------------------------- the arithmetic


def test_advantages_are_group_normalized_and_a_constant_reward_gives_zero():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 1.0, np.nan, 2.0]])
    a = advantage(r, "grpo")
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # Bessel's correction, as TRL (torch.std)
    assert a[0] == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4)])
    assert a[1] == pytest.approx([0, 0, 0, 0])  # a constant reward: nothing to prefer
    third = np.array([3.0, 1.0, 0.0, 2.0])  # no reward applied counts 0
    assert a[2] == pytest.approx((third - third.mean()) / (third.std(ddof=1) + 1e-4))
    assert advantage(r, "dr_grpo")[0] == pytest.approx([0.5, -0.5, -0.5, 0.5])  # Dr. GRPO: no std scaling
    assert advantage(r, "dapo")[0] == pytest.approx(a[0])
    # TRL's scale_rewards: none, or the whole batch's std (PPO-Lite) in place of each group's
    assert advantage(r, "grpo", "none")[0] == pytest.approx([0.5, -0.5, -0.5, 0.5])
    every = np.nan_to_num(r).reshape(-1)
    assert advantage(r, "dr_grpo", "batch")[2] == pytest.approx((third - third.mean()) / (every.std(ddof=1) + 1e-4))


class Fixed:
    """A real MLX module whose logits are its parameter: the loss's arithmetic alone is under test."""

    @staticmethod
    def make(logits):
        import mlx.nn as nn

        class Logits(nn.Module):
            def __init__(self):
                super().__init__()
                self.logits = logits

            def __call__(self, inputs):
                return self.logits

        return Logits()


def objective(loss_type, beta=0.0, mu=1, epsilon=0.2, *more):
    from tuning_fork.objectives.grpo import GRPO

    cfg = compose_cfg("objective=grpo", f"objective.loss_type={loss_type}", f"objective.beta={beta}",
                      f"objective.iterations_per_batch={mu}", f"objective.epsilon={epsilon}", "objective.max_tokens=4",
                      "+objective.rewards=[{_target_: tuning_fork.rewards.length, target: 3}]", *more)
    return GRPO(cfg)


def test_the_configured_scale_rewards_reaches_the_advantages():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 0.0, 2.0]])
    for loss_type, scale in (("grpo", None), ("grpo", "none"), ("grpo", "batch"), ("dr_grpo", None),
                             ("dr_grpo", "group")):
        setting = [] if scale is None else [f"objective.scale_rewards={scale}"]
        ours = objective(loss_type, 0.0, 1, 0.2, *setting).advantages(r)
        assert ours == pytest.approx(advantage(r, loss_type, scale)), (loss_type, scale)
    assert not np.allclose(objective("grpo", 0.0, 1, 0.2, "objective.scale_rewards=batch").advantages(r),
                           objective("grpo").advantages(r))


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("mu", [1, 2])
def test_the_loss_equals_a_hand_computation(loss_type, mu):
    import mlx.core as mx

    rng = np.random.default_rng(3)
    rows, width, vocab = 4, 6, 7
    logits = rng.normal(size=(rows, width - 1, vocab)).astype(np.float32)
    tokens = rng.integers(0, vocab, size=(rows, width)).astype(np.int32)
    mask = np.zeros((rows, width - 1), bool)
    for r, (lo, hi) in enumerate([(1, 5), (2, 4), (1, 2), (0, 5)]):
        mask[r, lo:hi] = True
    adv = np.array([1.0, -0.5, 2.0, -1.5], np.float32)
    logp = np.take_along_axis(log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
    old = (logp + rng.normal(scale=0.3, size=logp.shape)).astype(np.float32)  # the policy that sampled (μ > 1)
    ref = (logp + rng.normal(scale=0.5, size=logp.shape)).astype(np.float32)
    beta, eps = 0.1, 0.2
    o = objective(loss_type, beta=beta, mu=mu, epsilon=eps)
    model = Fixed.make(mx.array(logits))
    total = mx.array([1.0, 0.0, 0.5, np.nan], mx.float32)
    value, weight, aux = o.policy_loss(model, mx.array(tokens), mx.array(mask), mx.array(adv), mx.array(old),
                                       mx.array(ref), total, mx.array([[1.0, 0.0, 0.5, np.nan]], mx.float32),
                                       mx.array([3.0, 2.0, 1.0, 4.0]), mx.array(0.5))
    ratio = np.exp(logp - old) if mu > 1 else np.ones_like(logp)
    a = adv[:, None]
    per = -np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    per = per + beta * kl
    m = mask.astype(np.float64)
    want = {"grpo": ((per * m).sum(-1) / m.sum(-1)).mean(), "dapo": (per * m).sum() / m.sum(),
            "dr_grpo": (per * m).sum() / (rows * 4)}[loss_type]
    assert value.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert weight.item() == rows
    assert aux["kl"].item() == pytest.approx((kl * m).sum() / m.sum(), rel=1e-5)
    assert aux["reward_mean"].item() == pytest.approx(0.5)  # NaN (no reward applied) left out
    assert aux["completion_length"].item() == pytest.approx(2.5)
    clipped = (np.clip(ratio, 1 - eps, 1 + eps) * a < ratio * a)
    assert aux["clip_ratio"].item() == pytest.approx((clipped * m).sum() / m.sum(), abs=1e-6)


def test_with_equal_advantages_of_zero_the_policy_term_has_no_gradient():
    import mlx.core as mx
    import mlx.nn as nn

    rng = np.random.default_rng(0)
    o = objective("grpo", beta=0.0)
    model = Fixed.make(mx.array(rng.normal(size=(2, 4, 5)).astype(np.float32)))
    tokens = mx.array(rng.integers(0, 5, size=(2, 5)).astype(np.int32))
    mask = mx.ones((2, 4), mx.bool_)
    zeros = mx.zeros((2, 4))
    grad_fn = nn.value_and_grad(model, lambda m, *b: o.policy_loss(m, *b)[0])
    advantages = mx.array(advantage(np.array([[0.7, 0.7]]), "grpo").reshape(-1).astype(np.float32))
    value, grads = grad_fn(model, tokens, mask, advantages, zeros, zeros, mx.zeros(2), mx.zeros((1, 2)),
                           mx.ones(2), mx.array(0.0))
    assert value.item() == 0 and mx.abs(grads["logits"]).max().item() == 0


# ------------------------------------------------------------------------------------------- rewards


def build(*specs):
    return rewards.build(OmegaConf.create(list(specs)))


def test_built_in_rewards_and_trl_style_signatures():
    ex = build({"_target_": "tuning_fork.rewards.exact", "ignore_case": True})[0]
    assert ex.fn(prompts=["q"] * 3, completions=[" Paris ", "paris", [{"role": "assistant", "content": "Rome"}]],
                 answer=["Paris", "Paris", "Paris"]) == [1.0, 1.0, 0.0]
    num = build({"_target_": "tuning_fork.rewards.numeric", "field": "solution"})[0]
    assert num.fn(prompts=["q"] * 3, completions=["so 1,234.0", "it is 7 or 8", "none"],
                  solution=["1234", "7", "3"]) == [1.0, 0.0, 0.0]
    fmt = build({"_target_": "tuning_fork.rewards.format", "pattern": "^<a>.*</a>$", "weight": 0.5})[0]
    assert fmt.weight == 0.5 and fmt.fn(prompts=["q"] * 2, completions=["<a>x\ny</a>", "x"]) == [1.0, 0.0]
    total, per = rewards.score(build({"_target_": "tuning_fork.rewards.length", "target": 4, "weight": 2},
                                     {"_target_": "tuning_fork.rewards.format", "pattern": "b"}),
                               ["q", "q"], ["abcd", "xy"], {})
    assert per == {"length": [1.0, 0.5], "format": [1.0, 0.0]} and total == [3.0, 1.0]


def my_reward(prompts, completions, answer, **kwargs):
    return [1.0 if answer[i] in c else None for i, c in enumerate(completions)]


def bad_count(prompts, completions, **kwargs):
    return [1.0]


def raises(prompts, completions, **kwargs):
    raise KeyError("no such thing")


def words(prompts, completions, **kwargs):
    return ["many" for _ in completions]


def test_a_reward_written_for_trl_works_and_none_counts_as_nothing():
    total, per = rewards.score(build({"_target_": f"{__name__}.my_reward", "name": "mine"},
                                     {"_target_": "tuning_fork.rewards.length", "target": 1, "weight": 0.0}),
                               ["q", "q"], ["x 5", "y"], {"answer": ["5", "5"]})
    assert per["mine"] == [1.0, None] and total == [1.0, 0.0]


@pytest.mark.parametrize("target, needle", [(f"{__name__}.bad_count", "reward bad_count returned 1 values for 2"),
                                            (f"{__name__}.raises", "reward raises raised KeyError"),
                                            (f"{__name__}.words", "reward words returned list values that are not")])
def test_a_broken_reward_is_one_line_naming_it(target, needle):
    with pytest.raises(TuningForkError, match=needle) as e:
        rewards.score(build({"_target_": target}), ["q", "q"], ["a", "b"], {})
    assert "\n" not in str(e.value)


def test_reward_config_mistakes():
    with pytest.raises(ConfigError, match="needs objective.rewards"):
        rewards.build([])
    with pytest.raises(ConfigError, match=r"objective.rewards\[0\] \(nowhere.fn\).*importable"):
        build({"_target_": "nowhere.fn"})
    with pytest.raises(TuningForkError, match="no field 'answer'"):
        rewards.score(build({"_target_": "tuning_fork.rewards.exact"}), ["q"], ["a"], {"solution": ["a"]})


# ------------------------------------------------------------------------------------------- the CLI

REWARDS = textwrap.dedent('''
    def short_and_has_a(prompts, completions, answer, **fields):
        """The demo's reward in miniature: completions near 12 characters that contain the letter a."""
        return [max(0.0, 1 - abs(len(c) - 12) / 12) + ("a" in c) for c in completions]
''')


def grpo_setup(tmp_path, n=12):
    write_jsonl(tmp_path / "d" / "train.jsonl", [{"prompt": f"Say {i}.", "answer": str(i)} for i in range(n)])
    write_jsonl(tmp_path / "d" / "valid.jsonl", [{"prompt": f"Say {i}.", "answer": str(i)} for i in range(90, 94)])
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "demo_rewards.py").write_text(REWARDS)
    args = ["objective=grpo", "data=jsonl", f"data.path={tmp_path / 'd'}", "objective.group_size=3",
            "objective.max_tokens=12", "+objective.rewards=[{_target_: demo_rewards.short_and_has_a}]",
            "schedule.batch_size=2", "objective.log_samples=3"]
    return args, {"PYTHONPATH": str(tmp_path / "mods")}


@pytest.mark.slow
def test_a_grpo_run_logs_rewards_kl_lengths_times_and_samples(tmp_path):
    args, env = grpo_setup(tmp_path)
    run_dir = tmp_path / "run"
    proc = run_cli(*args, "schedule.iters=6", "schedule.epochs=null", "schedule.steps_per_eval=3",
                   "schedule.steps_per_report=2", f"hydra.run.dir={run_dir}", "optimized_metric=best_val_reward_mean",
                   "wandb.project=grpo-test", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*"))  # the samples went to W&B as a table too
    metrics = read_metrics(run_dir)
    train = [m for m in metrics if "train_loss" in m]
    for key in ("train_reward_mean", "train_reward_std", "train_reward/short_and_has_a", "train_kl",
                "train_completion_length", "train_clip_ratio", "train_generation_seconds",
                "train_completions_per_second"):
        assert all(key in m and math.isfinite(m[key]) for m in train), key
    assert all(0 < m["train_completion_length"] <= 12 for m in train)
    vals = [m for m in metrics if "val_reward_mean" in m]
    assert [m["iteration"] for m in vals] == [0, 3, 6]
    samples = [json.loads(x) for x in (run_dir / "samples" / "iteration-0000003.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and {"prompt", "completion", "reward", "reward/short_and_has_a"} <= set(samples[0])
    result = json.loads((run_dir / "results.json").read_text())
    assert "best_val_reward_mean" in result and result["best_val_reward_mean"] == max(m["val_reward_mean"] for m in vals)
    assert "test_ppl" not in result
    proc = run_cli(*args, "summary=true", f"hydra.run.dir={tmp_path / 'sum'}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "sum" / "summary.json").read_text())
    assert summary["splits"]["train"]["records"] == 12 and summary["plan"]["steps_per_epoch"] == 6


@pytest.mark.slow
def test_a_stopped_grpo_run_reusing_its_batches_resumes_exactly(tmp_path):
    from .test_resume import stop_midway

    args, env = grpo_setup(tmp_path)
    args += ["objective.iterations_per_batch=2", "schedule.iters=40", "schedule.epochs=null",
             "schedule.steps_per_report=1", "schedule.steps_per_eval=20", "schedule.save_every=3",
             "objective.log_samples=0"]
    whole = tmp_path / "whole"
    proc = run_cli(*args, f"hydra.run.dir={whole}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    code, err = stop_midway(run_dir, 7, *args, env=env)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    proc = run_cli(*args, f"hydra.run.dir={run_dir}", "resume=true", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_resumed_exactly(run_dir, whole)


@pytest.mark.slow
def test_grpo_mistakes_are_one_line_errors(tmp_path):
    args, env = grpo_setup(tmp_path)
    one_line_error(run_cli(*args[:-3], "objective.group_size=1", "+objective.rewards=[{_target_: demo_rewards.x}]",
                           env=env), "objective.group_size=1")
    one_line_error(run_cli(*args, "objective.loss_type=sigmoid", env=env), "objective.loss_type=sigmoid")
    one_line_error(run_cli(*args, "data.max_seq_length=8", env=env), "leave no room for objective.max_tokens=12")
    one_line_error(run_cli("objective=grpo", env=env), "needs objective.rewards")


@pytest.mark.slow
def test_the_demo_experiment_and_the_sft_grpo_pipeline_run(tmp_path):
    short = ("schedule.iters=3", "schedule.steps_per_eval=3", "objective.group_size=2", "objective.max_tokens=8")
    proc = run_cli("experiment=demo_grpo", "debug=fast", *short, f"hydra.run.dir={tmp_path / 'demo'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val_reward/says_hz" in read_metrics(tmp_path / "demo")[0]
    # (the command line's schedule keys win over the stages' own)
    proc = run_cli("pipeline=sft_grpo", "debug=fast", *short[:2], "objective.group_size=2", f"hydra.run.dir={tmp_path / 'p'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    grpo = json.loads((tmp_path / "p" / "grpo" / "results.json").read_text())
    assert "best_val_reward_mean" in grpo and (tmp_path / "p" / "grpo" / "samples").is_dir()
    config = (tmp_path / "p" / "grpo" / ".hydra" / "config.yaml").read_text()
    assert f"init_from: {tmp_path / 'p' / 'sft'}" in config  # the sft stage's adapters: the start and the reference


@pytest.mark.parametrize("chunk", [7, 64])
def test_chunked_token_log_probabilities_and_their_gradients_equal_the_whole_logits(chunk):
    """step.token_logps with a chunk (its own VJP) against the plain path, on the built-in model with LoRA."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map

    from tuning_fork import models
    from tuning_fork.step import output_head, token_logps

    cfg = compose_cfg()
    model, _ = models.load(cfg.model)
    mx.random.seed(0)
    models.attach(model, cfg.adapter, cfg.model)
    mx.eval(model.parameters())
    assert output_head(model) is not None  # the chunked path is the one under test
    # LoRA's B starts at zero: move every trainable weight, so that each has a gradient of its own
    model.update(tree_map(lambda w: w + 0.01 * mx.random.normal(w.shape).astype(w.dtype), model.trainable_parameters()))
    tokens = mx.array(np.random.default_rng(1).integers(0, 200, (3, 21)).astype(np.int32))
    weights = mx.array(np.random.default_rng(2).normal(size=(3, 20)).astype(np.float32))

    def total(m, c):
        return (token_logps(m, tokens, c) * weights).sum()

    plain = nn.value_and_grad(model, lambda m: total(m, None))(model)
    chunked = nn.value_and_grad(model, lambda m: total(m, chunk))(model)
    assert np.allclose(np.array(token_logps(model, tokens, chunk)), np.array(token_logps(model, tokens, None)),
                       atol=1e-4)
    assert chunked[0].item() == pytest.approx(plain[0].item(), rel=1e-5)
    for (name, a), (_, b) in zip(tree_flatten(plain[1]), tree_flatten(chunked[1])):
        assert np.allclose(np.array(a), np.array(b), atol=1e-5, rtol=1e-4), name


def test_resuming_within_a_reused_batch_reads_it_back_then_draws_the_next_prompts(tmp_path):
    """train_batches(start) yields what the uninterrupted iterator yields from that step on, with μ = 2: at an
    odd step the batch in use comes back from RUN/grpo/, and the prompts that follow are the next batch's."""
    from tuning_fork import data, models
    from tuning_fork.objectives.grpo import GRPO

    args, _ = grpo_setup(tmp_path)
    cfg = compose_cfg(*[a for a in args if "demo_rewards" not in a], "objective.iterations_per_batch=2",
                      "+objective.rewards=[{_target_: tuning_fork.rewards.length, target: 5}]")
    objective = GRPO(cfg)
    sets = objective.encode(data.load_splits(cfg.data), models.load_tokenizer(models.resolve("tiny")))
    model, _ = models.load(cfg.model)
    models.attach(model, cfg.adapter, cfg.model)
    objective.prepare(model, sets, tmp_path, False)
    whole = objective.train_batches(sets["train"], 0)
    first = [next(whole) for _ in range(4)]  # groups 0, 0, 1, 1: group 1 is now in RUN/grpo/
    resumed = objective.train_batches(sets["train"], 3)  # stopped after 3 steps: group 1 once more, then 2
    again = [next(resumed) for _ in range(3)]
    later = [next(whole) for _ in range(2)]  # group 2, twice
    for a, b in zip([first[3], *later], again):
        assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(a[:5], b[:5]))
    assert not np.array_equal(np.array(first[3][0]), np.array(later[0][0]))  # the next group's prompts differ
    (tmp_path / "grpo" / "batch-rank0.npz").unlink()
    with pytest.raises(TuningForkError, match="does not hold batch 1"):
        next(objective.train_batches(sets["train"], 3))


@pytest.mark.slow
def test_grpo_on_a_mixture_with_task_metrics_from_the_answer_field(tmp_path):
    args, env = grpo_setup(tmp_path)
    other = tmp_path / "other"
    write_jsonl(other / "train.jsonl", [{"messages": [{"role": "user", "content": f"Count to {i}."},
                                                      {"role": "assistant", "content": " ".join(map(str, range(i)))}]}
                                        for i in range(1, 7)])
    args = [a for a in args if not a.startswith("data")]
    proc = run_cli(*args, "data=mix", f"data.sources.say.path={tmp_path / 'd'}", f"data.sources.count.path={other}",
                   "data.sources.count.weight=1", "data.sources.say.weight=1", "data.records_per_epoch=8",
                   "schedule.iters=4", "schedule.epochs=null", "schedule.steps_per_eval=4", "eval.generate.records=2",
                   f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mix · say 4 of 12 + count 4 of 6 = 8 records per epoch" in proc.stdout
    last = [m for m in read_metrics(tmp_path / "run") if "val_reward_mean" in m][-1]
    assert "val_exact_match" in last and "val_loss/say" in last  # the say prompts' `answer` is the reference
