"""The step's launch settings: on CUDA, direct kernel launches with the host paced by a memory limit."""

import os

import numpy as np
import pytest


def limit_now() -> int:
    import mlx.core as mx

    limit = mx.set_memory_limit(0)
    mx.set_memory_limit(limit)
    return limit


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
            value, _, grad = step((tokens, mx.ones((tokens.shape[0], tokens.shape[1] - 1), dtype=mx.bool_)),
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
