"""The step's launch settings: on CUDA, direct kernel launches with the host paced by a memory limit."""

import os

import numpy as np
import pytest


def limit_now() -> int:
    import mlx.core as mx

    return mx.get_memory_limit()


def tiny_lora_model(mixed: bool = False):
    """A 2-block random Llama with rank-4 LoRA on every linear; `mixed`: the second block in bfloat16, so that
    the trainable weights come in two dtypes."""
    import mlx.core as mx
    from mlx_lm.models import llama

    from tuning_fork.models import import_tuner

    import_tuner()
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(dict(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, rms_norm_eps=1e-5, tie_word_embeddings=True)))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    if mixed:
        model.layers[1].set_dtype(mx.bfloat16)
    return model


def test_direct_cuda_launches_leaves_other_devices_alone(monkeypatch):
    import mlx.core as mx

    from tuning_fork.step import CUDA_LAUNCHES, direct_cuda_launches

    for key in CUDA_LAUNCHES:
        monkeypatch.delenv(key, raising=False)
    assert direct_cuda_launches() is mx.cuda.is_available()
    assert all((key in os.environ) is mx.cuda.is_available() for key in CUDA_LAUNCHES)


def test_host_pace_runs_first_updates_and_new_largest_batches_in_order_then_caps_memory():
    """A step runs strictly in order (a one-byte memory limit) until the first update and whenever its batch
    is bigger than any before; after it the limit is just under the peak so far. Paced steps compute what
    unpaced ones do, and closing restores the limit that was there before."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from tuning_fork.step import HEADROOM, HostPace, make_step

    rng = np.random.default_rng(0)
    shapes = [(4, 17), (4, 17), (4, 17), (8, 33), (4, 17), (8, 33)]  # (rows, length + 1) per step
    batches = [mx.array(rng.integers(0, 100, shape)) for shape in shapes]
    strict_at = [1, 2, 4]  # the first update is step 2 (accumulation 2); step 4 is the first bigger batch

    def losses(paced: bool) -> list[float]:
        model = tiny_lora_model()
        step, state = make_step(model, optim.Adam(learning_rate=1e-2), accumulation=2)
        grad, out, cap = None, [], None
        before = limit_now()
        pace = HostPace(paced)
        for n, tokens in enumerate(batches, 1):
            pace.before(tokens.size)
            if paced:
                assert (limit_now() == 1) == (n in strict_at), n
            value, _, _, grad = step((tokens, mx.ones((tokens.shape[0], tokens.shape[1] - 1), dtype=mx.bool_)),
                                  grad, n % 2 == 0)
            mx.eval(state, value, grad)
            pace.stepped(n % 2 == 0)
            out.append(value.item())
            if paced:
                if n in strict_at:
                    cap = int(mx.get_peak_memory() * HEADROOM)
                assert limit_now() == cap > 1, n
        pace.close()
        assert limit_now() == before
        return out

    assert losses(True) == pytest.approx(losses(False), rel=1e-6)


@pytest.mark.slow
def test_a_paced_training_run_matches_an_unpaced_one(tmp_path, monkeypatch):
    """The training loop with pacing on (as on CUDA; forced here on the CPU) over length-bucketed batches of
    varying sizes: the same losses as without, and MLX's memory limit is given back afterwards."""
    import json

    from tuning_fork import train as train_module

    from .conftest import compose_cfg, make_data

    folder = make_data(tmp_path / "d", n_train=40, n_valid=8)
    records = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    for rec in records[::5]:  # some long records, so that batches differ in size
        rec["messages"][1]["content"] += " and that is all there is to it" * 6
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ("data=jsonl", f"data.path={folder}", "schedule.epochs=2", "schedule.batch_size=4",
              "schedule.grad_accumulation_steps=2", "schedule.learning_rate=1e-3")
    before = limit_now()
    plain = train_module.train(compose_cfg(*common, f"output_dir={tmp_path / 'plain'}"))
    monkeypatch.setattr(train_module, "direct_cuda_launches", lambda: True)
    paced = train_module.train(compose_cfg(*common, f"output_dir={tmp_path / 'paced'}"))
    assert limit_now() == before
    for key in ("first_val_loss", "val_loss", "train_loss"):
        assert paced[key] == pytest.approx(plain[key], rel=1e-5), key


def test_the_compiled_step_computes_what_the_uncompiled_step_does():
    """The suite runs steps uncompiled (conftest.py: no C++ compiles on a fresh machine); users run them
    compiled. Three LoRA steps with dropout, compiled and not: the same losses and the same trained weights."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from tuning_fork import models
    from tuning_fork.step import make_step

    rng = np.random.default_rng(0)
    batches = [(mx.array(rng.integers(3, 500, (4, 32)).astype(np.int32)), mx.array(rng.random((4, 31)) < 0.8))
               for _ in range(3)]

    def train(compiled: bool):
        (mx.enable_compile if compiled else mx.disable_compile)()
        try:
            model, _ = load(models.resolve("tiny"))
            model.freeze()
            mx.random.seed(0)  # the same LoRA initialization
            linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.1})
            step, state = make_step(model, optim.Adam(learning_rate=1e-3), 1)
            losses = []
            for i, batch in enumerate(batches):
                mx.random.seed(i)
                value, *_ = step(batch, None, True)
                mx.eval(state, value)
                losses.append(value.item())
            return losses, dict(tree_flatten(model.trainable_parameters()))
        finally:
            (mx.disable_compile if os.environ.get("MLX_DISABLE_COMPILE") == "1" else mx.enable_compile)()

    (plain, weights), (fused, compiled_weights) = train(False), train(True)
    assert fused == pytest.approx(plain, rel=1e-5)
    assert max(float(mx.abs(weights[k] - compiled_weights[k]).max()) for k in weights) < 1e-5


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adam"])
def test_the_flat_update_equals_the_per_parameter_update(optimizer):
    """step.flat_update (one all-reduce and one optimizer update over the concatenated gradients, what make_step
    does with several ranks) gives the per-parameter path's weights and optimizer state bit for bit, in the
    per-parameter layout that checkpoints keep: AdamW under a warmup-cosine schedule, SGD with momentum and
    Nesterov, plain Adam; trainable weights in two dtypes; accumulation over two batches."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from mlx.utils import tree_unflatten

    from tuning_fork.step import FLAT_KEY, flatten_optimizer_state, make_step, per_parameter_state

    rng = np.random.default_rng(0)
    batches = [mx.array(rng.integers(0, 100, (4, 17))) for _ in range(6)]

    def build():
        if optimizer == "adamw":
            lr = optim.join_schedules([optim.linear_schedule(0, 1e-2, 2), optim.cosine_decay(1e-2, 10)], [2])
            return optim.AdamW(learning_rate=lr, weight_decay=0.1)
        if optimizer == "sgd":
            return optim.SGD(learning_rate=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)
        return optim.Adam(learning_rate=1e-2, bias_correction=True)

    def train(flat: bool):
        model, opt = tiny_lora_model(mixed=True), build()
        step, state = make_step(model, opt, accumulation=2, flat=flat)
        grad, losses = None, []
        for n, tokens in enumerate(batches, 1):
            value, _, _, grad = step((tokens, mx.ones((4, 16), dtype=mx.bool_)), grad, n % 2 == 0)
            mx.eval(state, value, grad)
            losses.append(value.item())
        assert (FLAT_KEY in opt.state) is flat
        train.last = opt
        return losses, dict(tree_flatten(model.trainable_parameters())), dict(tree_flatten(per_parameter_state(model, opt)))

    (losses, weights, states), (flat_losses, flat_weights, flat_states) = train(False), train(True)
    restored = build()  # a checkpoint's per-parameter state, flattened again, is the state it was saved from
    restored.state = tree_unflatten(list(flat_states.items()))
    flatten_optimizer_state(tiny_lora_model(mixed=True), restored)
    saved = dict(tree_flatten(train.last.state))
    assert list(dict(tree_flatten(restored.state))) == list(saved)
    assert all(mx.array_equal(v, saved[k]) for k, v in tree_flatten(restored.state))
    assert flat_losses == losses
    assert {str(a.dtype) for a in weights.values()} == {"mlx.core.float32", "mlx.core.bfloat16"}
    assert list(flat_weights) == list(weights) and list(flat_states) == list(states)
    for key in weights:
        assert flat_weights[key].dtype == weights[key].dtype and mx.array_equal(flat_weights[key], weights[key]), key
    for key in states:
        assert mx.array_equal(flat_states[key], states[key]), key
    assert not mx.array_equal(weights["model.layers.0.self_attn.q_proj.lora_b"],
                              mx.zeros_like(weights["model.layers.0.self_attn.q_proj.lora_b"]))  # it trained


def test_the_flat_update_is_used_with_several_ranks_and_an_elementwise_optimizer_only():
    import mlx.optimizers as optim

    from tuning_fork import step

    model = tiny_lora_model()
    assert step.elementwise(optim.AdamW(1e-3)) and step.elementwise(optim.SGD(1e-3)) and step.elementwise(optim.Lion(1e-3))
    assert not step.elementwise(optim.Adafactor()) and not step.elementwise(optim.Muon(1e-3))
    assert not step.use_flat_update(model, optim.AdamW(1e-3))  # one process: mlx's per-parameter update
