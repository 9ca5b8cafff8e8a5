"""The memory-lean layers (tuning_fork/layers.py) against mlx-lm's: the same loss and gradients, less memory."""

import pytest


def model_of(family: str, dtype: str = "float32", quantized: bool = False, dropout: float = 0.0, seed: int = 0,
             keys: list | None = None, **extra):
    """A small random model of an mlx-lm family with LoRA rank 8 on every linear; trained-looking (nonzero) B."""
    import importlib

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map

    from tuning_fork.models import import_tuner

    import_tuner()
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(seed)
    args = {**dict(model_type=family, hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=101, rms_norm_eps=1e-5, rope_theta=1e4,
                   tie_word_embeddings=True, max_position_embeddings=256), **extra}
    module = importlib.import_module(f"mlx_lm.models.{family}")
    known = module.ModelArgs.__dataclass_fields__
    model = module.Model(module.ModelArgs(**{k: v for k, v in args.items() if k in known}))
    model.set_dtype(getattr(mx, dtype))
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    model.freeze()
    linear_to_lora_layers(model, args["num_hidden_layers"], {"rank": 8, "scale": 2.0, "dropout": dropout, **({"keys": keys} if keys else {})})
    model.update(tree_map(lambda w: 0.05 * mx.random.normal(w.shape), model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


def loss_and_grads(model, seed: int = 1, rows: int = 3, width: int = 24):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from tuning_fork.step import loss

    mx.random.seed(seed)
    tokens = mx.random.randint(0, 101, (rows, width + 1))
    mask = mx.random.uniform(shape=(rows, width)) > 0.2
    value, grads = nn.value_and_grad(model, lambda m, *b: loss(m, *b)[0])(model, tokens, mask)
    mx.eval(value, grads)
    return value.item(), dict(tree_flatten(grads))


def assert_close(plain, lean, rtol, atol):
    import mlx.core as mx

    assert lean[0] == pytest.approx(plain[0], rel=rtol)
    assert plain[1].keys() == lean[1].keys() and any(".mlp." in k and "lora_b" in k for k in plain[1])
    for k in plain[1]:
        a, b = plain[1][k].astype(mx.float32), lean[1][k].astype(mx.float32)
        scale = mx.abs(a).max().item()
        assert mx.abs(a - b).max().item() <= atol * scale + 1e-7, k


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_lean_layers_give_the_same_loss_and_gradients_in_float32(family):
    from tuning_fork import layers

    plain = loss_and_grads(model_of(family))
    model = model_of(family)
    assert layers.lean(model, mlps=True) == {"lora": 14, "mlp": 2}
    assert_close(plain, loss_and_grads(model), rtol=1e-5, atol=1e-5)


def test_lean_layers_without_the_fused_add_give_the_same_loss_and_gradients(monkeypatch):
    """layers.ADDMM=False (gpu_step's +noaddmm): the low-rank sum as a matmul, then an add."""
    from tuning_fork import layers

    monkeypatch.setattr(layers, "ADDMM", False)
    plain = loss_and_grads(model_of("llama"))
    model = model_of("llama")
    layers.lean(model, mlps=True)
    assert_close(plain, loss_and_grads(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keys,bias", [(["mlp.down_proj", "self_attn.q_proj"], False),
                                       (["mlp.gate_proj"], True)])
def test_lean_mlps_with_lora_on_some_projections_and_biases(keys, bias):
    """adapter.keys may leave some of the MLP's projections frozen, and an MLP may have biases (mlp_bias)."""
    from tuning_fork import layers

    plain = loss_and_grads(model_of("llama", keys=keys, mlp_bias=bias))
    model = model_of("llama", keys=keys, mlp_bias=bias)
    assert layers.lean(model, mlps=True)["mlp"] == 2
    down = model.layers[0].mlp.down_proj
    assert ("bias" in getattr(down, "linear", down)) == bias
    assert_close(plain, loss_and_grads(model), rtol=1e-5, atol=1e-5)


def test_lean_layers_on_a_quantized_base_qlora():
    from tuning_fork import layers

    plain = loss_and_grads(model_of("llama", quantized=True))
    model = model_of("llama", quantized=True)
    assert layers.lean(model, mlps=True) == {"lora": 14, "mlp": 2}
    assert_close(plain, loss_and_grads(model), rtol=1e-5, atol=1e-5)


def test_lean_layers_in_bfloat16_match_within_its_precision_and_save_memory():
    """In bf16 the LoRA branch is computed in bf16 (as PyTorch autocast does), so the gradients agree to bf16's
    precision; the backward pass holds less: no float32 copies of the inputs, no SwiGLU intermediates."""
    import mlx.core as mx

    from tuning_fork import layers

    def peak(model):
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        out = loss_and_grads(model, rows=16, width=64)
        return out, mx.get_peak_memory() - before

    plain, plain_peak = peak(model_of("llama", "bfloat16"))
    model = model_of("llama", "bfloat16")
    layers.lean(model, mlps=True)
    lean, lean_peak = peak(model)
    assert_close(plain, lean, rtol=2e-2, atol=5e-2)
    assert lean_peak < 0.85 * plain_peak, (lean_peak, plain_peak)
    cast_only = model_of("llama", "bfloat16")
    layers.lean(cast_only, mlps=False)  # the LoRA branches in bf16 alone: no float32 copies of their inputs
    cast, cast_peak = peak(cast_only)
    assert_close(plain, cast, rtol=2e-2, atol=5e-2)
    assert lean_peak < cast_peak < 0.9 * plain_peak, (lean_peak, cast_peak, plain_peak)
    checkpointed = model_of("llama", "bfloat16")
    layers.checkpoint_blocks(checkpointed)  # each block keeps its input alone
    again, again_peak = peak(checkpointed)
    assert_close(plain, again, rtol=1e-5, atol=1e-5)
    assert again_peak < 0.9 * plain_peak, (again_peak, plain_peak)


def test_lean_leaves_what_it_cannot_replace():
    """DoRA layers, MLPs of other activations (gemma's GELU) and LoRA with dropout keep mlx-lm's layers."""
    from mlx_lm.tuner.lora import LoRALinear

    from tuning_fork import layers

    assert layers.is_swiglu(__import__("mlx_lm.models.llama", fromlist=["MLP"]).MLP)
    assert not layers.is_swiglu(__import__("mlx_lm.models.gemma", fromlist=["MLP"]).MLP)
    model = model_of("llama", dropout=0.1)
    assert layers.lean(model, dropout=0.1, mlps=True) == {"lora": 14, "mlp": 0}
    assert type(model.layers[0].mlp).__name__ == "MLP"
    gemma = model_of("gemma")
    assert layers.lean(gemma, mlps=True) == {"lora": 14, "mlp": 0}
    assert layers.lean(model_of("llama"), mlps=False) == {"lora": 14, "mlp": 0}
    assert all(type(m) is not LoRALinear for _, m in gemma.named_modules())


def test_checkpointed_blocks_give_the_same_gradients_and_sample_plainly(monkeypatch):
    """schedule.grad_checkpoint: the same loss and gradients; in eval mode a block runs without mx.checkpoint,
    so sampling with a KV cache (GRPO's rollouts) is the plain model's; other models of the class are untouched."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from tuning_fork import layers

    plain = loss_and_grads(model_of("qwen3"))
    model = model_of("qwen3")
    reference = model_of("qwen3")
    layers.lean(model, mlps=True)
    layers.checkpoint_blocks(model)
    layers.checkpoint_blocks(model)  # (twice is once)
    assert type(model.layers[0]).checkpointed and type(model.layers[0]).__mro__[1] is type(reference.layers[0])
    assert not hasattr(type(reference.layers[0]), "checkpointed")
    calls = []
    real = layers.mx.checkpoint
    monkeypatch.setattr(layers.mx, "checkpoint", lambda fn: calls.append(fn) or real(fn))  # counts, then the real one
    assert_close(plain, loss_and_grads(model), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # each block, while training
    model.eval()
    reference.eval()
    prompt = mx.array([5, 7, 11, 13])
    ours = [t for t, _ in zip(generate_step(prompt, model, max_tokens=8), range(8))]
    theirs = [t for t, _ in zip(generate_step(prompt, reference, max_tokens=8), range(8))]
    assert [int(t) for t, _ in ours] == [int(t) for t, _ in theirs]
    assert len(calls) == 2  # sampling never went through mx.checkpoint


def test_checkpointing_a_part_of_each_block_gives_the_same_gradients_with_less_saved():
    """schedule.checkpoint_part: the attention (through mx.checkpoint), the MLP (our SwiGLU's VJP keeps its input
    alone and recomputes gate and up) or the whole block; schedule.checkpoint_layers: the first N blocks only.
    Each gives the plain loss and gradients; what the backward pass keeps falls in the order of what is
    recomputed (peaks of 6-block bf16 models, the MLP 4x the hidden size as in Llama: the transients of one block
    matter less)."""
    import mlx.core as mx

    from tuning_fork import layers

    def run(part=None, count=None):
        model = model_of("llama", "bfloat16", num_hidden_layers=6, intermediate_size=256)
        layers.lean(model, mlps=True)
        checkpointed = layers.checkpoint_blocks(model, part, count) if part else 0
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        out = loss_and_grads(model, rows=16, width=64)
        return model, checkpointed, out, mx.get_peak_memory() - before

    _, _, lean, lean_peak = run()
    peaks = {}
    for part in ("attention", "mlp", "block"):
        model, count, out, peaks[part] = run(part)
        assert count == 6
        assert_close(lean, out, rtol=1e-5, atol=1e-5)  # (recomputed in the same bf16: the same numbers)
    assert type(model.layers[0]).checkpointed
    assert peaks["block"] < min(peaks["mlp"], peaks["attention"]) and max(peaks.values()) < 0.9 * lean_peak, (peaks,
                                                                                                   lean_peak)
    model, count, out, two_peak = run("mlp", 2)
    assert count == 2 and [m.recompute for m in (b.mlp for b in model.layers)] == [True] * 2 + [False] * 4
    assert_close(lean, out, rtol=1e-5, atol=1e-5)
    assert peaks["mlp"] < two_peak < lean_peak, (peaks["mlp"], two_peak, lean_peak)
    model, count, _, _ = run("attention", 1)
    assert [hasattr(type(b.self_attn), "checkpointed") for b in model.layers] == [True] + [False] * 5


def test_checkpointing_an_mlp_that_is_not_ours_and_a_block_without_the_part():
    """An MLP our layers leave alone (gemma's GELU) goes through mx.checkpoint; a block without attention (mamba's)
    is a one-line ConfigError naming the key."""
    import importlib

    from tuning_fork import layers
    from tuning_fork.errors import ConfigError

    plain = loss_and_grads(model_of("gemma"))
    gemma = model_of("gemma")
    layers.lean(gemma, mlps=True)
    assert layers.checkpoint_blocks(gemma, "mlp") == 2 and type(gemma.layers[0].mlp).checkpointed
    assert_close(plain, loss_and_grads(gemma), rtol=1e-5, atol=1e-5)
    mamba = importlib.import_module("mlx_lm.models.mamba")
    model = mamba.Model(mamba.ModelArgs(model_type="mamba", vocab_size=50, hidden_size=16, intermediate_size=32,
                                        state_size=4, num_hidden_layers=2, conv_kernel=4, use_bias=False,
                                        use_conv_bias=True, time_step_rank=4))
    with pytest.raises(ConfigError, match=r"schedule\.checkpoint_part=attention: .*no self_attn or attention or attn"):
        layers.checkpoint_blocks(model, "attention")


@pytest.mark.parametrize("part,lean,dora", [("block", True, False), ("attention", True, False),
                                            ("block", False, False), ("mlp", False, True)])
def test_checkpointing_with_adapter_dropout_gives_the_gradient_of_the_loss(part, lean, dora, monkeypatch):
    """The recomputed part draws the dropout masks its forward pass drew (each checkpointed call has a key of its
    own), with our LoRA layers, mlx-lm's (lean_layers=false) and DoRA's: the gradients equal those of the same
    calls without recomputation, and for LoRA the gradient along a random direction equals the loss's central
    difference with the same seed (DoRA's gradient leaves out its norm's, by design). A plain mx.checkpoint
    (mlx-lm's grad_checkpoint) draws new masks and fails both."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map

    from tuning_fork import layers
    from tuning_fork.models import import_tuner
    from tuning_fork.step import loss

    import_tuner()
    from mlx_lm.tuner.dora import DoRALinear

    mx.random.seed(1)
    tokens, mask = mx.random.randint(0, 101, (3, 25)), mx.ones((3, 24), mx.bool_)
    model = model_of("llama", dropout=0.1)
    if dora:
        for _, block in model.named_modules():
            for name, child in block.children().items():
                if type(child).__name__ == "LoRALinear":
                    setattr(block, name, DoRALinear.from_base(child.linear, r=8, dropout=0.1, scale=2.0))
        model.freeze()
        model.unfreeze(keys=["lora_a", "lora_b", "m"], strict=False)
    if lean:
        layers.lean(model, 0.1)
    layers.checkpoint_blocks(model, part)
    f = lambda m: loss(m, tokens, mask)[0]

    def at(shift):
        model.update(tree_map(lambda p, d: p + shift * d, params, direction))
        mx.random.seed(5)
        value = f(model).item()
        model.update(params)
        return value

    params = model.trainable_parameters()
    assert any("lora_a" in k for k, _ in tree_flatten(params))
    direction = tree_map(lambda p: mx.random.normal(p.shape, key=mx.random.key(7)), params)
    mx.random.seed(5)
    _, grads = nn.value_and_grad(model, f)(model)
    with monkeypatch.context() as m:
        m.setattr(layers.mx, "checkpoint", lambda fn: fn)  # the same calls and keys, nothing recomputed
        mx.random.seed(5)
        _, plain = nn.value_and_grad(model, f)(model)
    for (k, g), (_, p) in zip(tree_flatten(grads), tree_flatten(plain)):
        assert mx.allclose(g, p, rtol=1e-5, atol=1e-6).item(), k
    if not dora:
        along = sum((g * d).sum().item() for (_, g), (_, d) in zip(tree_flatten(grads), tree_flatten(direction)))
        eps = 1e-3
        assert along == pytest.approx((at(eps) - at(-eps)) / (2 * eps), rel=1e-2, abs=1e-3)
