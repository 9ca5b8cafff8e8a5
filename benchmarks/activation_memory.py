"""What a LoRA step's backward pass keeps per token and block, in units of the hidden size (one bf16 vector of
the hidden width = 1): mlx-lm's layers against tuning_fork's lean layers (tuning_fork/layers.py).

A random bf16 Llama (hidden 256, MLP 1024, 8 heads of 32, 2 KV heads) with LoRA rank 16 on every linear; the
peak memory of value_and_grad with 8 blocks less that with 4, over 4 blocks × tokens × hidden × 2 bytes. Short
rows (32 × 64), so that the CPU's attention matrices (a CUDA GPU's fused attention keeps none) stay small.

    python benchmarks/activation_memory.py        # plain, lora (the LoRA branch in bf16), lean (+ the SwiGLU VJP),
                                                  # then lean with schedule.grad_checkpoint=true and each
                                                  # schedule.checkpoint_part: attention, mlp, block
"""

from __future__ import annotations

ROWS, WIDTH, HIDDEN = 32, 64, 256


def peak(blocks: int, mode: str) -> int:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    from tuning_fork.layers import checkpoint_blocks, lean
    from tuning_fork.models import import_tuner
    from tuning_fork.step import loss

    import_tuner()
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(dict(
        model_type="llama", hidden_size=HIDDEN, num_hidden_layers=blocks, intermediate_size=4 * HIDDEN,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=1000, rms_norm_eps=1e-5,
        rope_theta=1e4, tie_word_embeddings=True)))
    model.set_dtype(mx.bfloat16)
    model.freeze()
    linear_to_lora_layers(model, blocks, {"rank": 16, "scale": 2.0, "dropout": 0.0})
    if mode != "plain":
        lean(model, mlps=mode != "lora")
    if mode.startswith("checkpoint-"):
        checkpoint_blocks(model, mode.split("-")[1])
    mx.eval(model.parameters())
    tokens = mx.random.randint(0, 1000, (ROWS, WIDTH + 1))
    mask = mx.ones((ROWS, WIDTH), mx.bool_)
    mx.eval(tokens, mask)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    value, grads = nn.value_and_grad(model, lambda m, *b: loss(m, *b)[0])(model, tokens, mask)
    mx.eval(value, grads)
    return mx.get_peak_memory() - before


def main():
    import tuning_fork  # noqa: F401  (MKL first on Linux CPUs)

    unit = 4 * ROWS * WIDTH * HIDDEN * 2  # (not 4 less 2 blocks: a checkpointed model's peak is a transient then)
    for mode in ("plain", "lora", "lean", "checkpoint-attention", "checkpoint-mlp", "checkpoint-block"):
        print(f"{mode:20s} {(peak(8, mode) - peak(4, mode)) / unit:5.1f} hidden-size vectors per token and block")


if __name__ == "__main__":
    main()
