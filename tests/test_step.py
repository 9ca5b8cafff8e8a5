"""The step's launch settings: on CUDA, direct kernel launches with the host paced by a memory limit."""

import os

import numpy as np
import pytest


def limit_now() -> int:
    import mlx.core as mx

    return mx.get_memory_limit()


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
    from mlx_lm.models import llama

    from tuning_fork.models import import_tuner
    from tuning_fork.step import HEADROOM, HostPace, make_step

    import_tuner()
    from mlx_lm.tuner.utils import linear_to_lora_layers

    rng = np.random.default_rng(0)
    shapes = [(4, 17), (4, 17), (4, 17), (8, 33), (4, 17), (8, 33)]  # (rows, length + 1) per step
    batches = [mx.array(rng.integers(0, 100, shape)) for shape in shapes]
    strict_at = [1, 2, 4]  # the first update is step 2 (accumulation 2); step 4 is the first bigger batch

    def losses(paced: bool) -> list[float]:
        mx.random.seed(0)
        model = llama.Model(llama.ModelArgs.from_dict(dict(
            model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, rms_norm_eps=1e-5, tie_word_embeddings=True)))
        model.freeze()
        linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
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
