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


def test_host_pace_runs_until_the_first_update_in_order_then_caps_memory_at_its_peak():
    """Strictly ordered steps (a one-byte memory limit) compute what unpaced steps compute; the limit then
    becomes the peak the first update needed, and closing restores the limit that was there before."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.models import llama

    from tuning_fork.models import import_tuner
    from tuning_fork.step import HEADROOM, HostPace, make_step

    import_tuner()
    from mlx_lm.tuner.utils import linear_to_lora_layers

    def losses(paced: bool) -> list[float]:
        mx.random.seed(0)
        model = llama.Model(llama.ModelArgs.from_dict(dict(
            model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, rms_norm_eps=1e-5, tie_word_embeddings=True)))
        model.freeze()
        linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
        step, state = make_step(model, optim.Adam(learning_rate=1e-2), accumulation=2)
        tokens = mx.array(np.random.default_rng(0).integers(0, 100, (4, 17)))
        batch, grad, out, cap = (tokens, mx.ones((4, 16), dtype=mx.bool_)), None, [], None
        before = limit_now()
        pace = HostPace(paced)
        for n in range(1, 5):
            value, _, grad = step(batch, grad, n % 2 == 0)
            mx.eval(state, value, grad)
            pace.stepped(n % 2 == 0)
            out.append(value.item())
            if paced:  # strict until the first update (step 2), then capped at the peak it needed
                cap = cap or (int(mx.get_peak_memory() * HEADROOM) if n == 2 else None)
                assert limit_now() == (1 if n < 2 else cap) and (cap or 2) > 1
        pace.close()
        assert limit_now() == before
        return out

    assert losses(True) == pytest.approx(losses(False), rel=1e-6)
