"""GRPO steps on a random Llama-like model (LoRA rank 16, alpha 32, every linear): tuning_fork's objective=grpo,
the code the CLI runs (objectives/grpo.py: mlx-lm's batched sampling, rewards, reference and loss; step.make_step).

Each step samples GROUP completions of up to COMPLETION tokens for each of PROMPTS random prompts of PROMPT
tokens (temperature 1, top_p 1), scores them with a length reward, computes the reference log-probabilities
(beta 0.04) and trains once (loss_type grpo, AdamW). benchmarks/grpo_trl.py runs the same work with TRL's
GRPOTrainer (PyTorch + PEFT). Random weights rarely sample the end token: completions run to their full length.

    python benchmarks/grpo_step.py {1b|smoke} PROMPTS GROUP PROMPT COMPLETION [checkpoint] [plain]
`checkpoint`: with schedule.grad_checkpoint=true (each block's activations recomputed in the backward pass);
`plain`: without the lean layers the CLI uses (schedule.lean_layers=false). Prints one `RESULT {json}` line: completions/s over whole steps (sampling, rewards, reference, training),
the seconds spent sampling, peak memory.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
WARMUP, STEPS = 2, 5


def tokenizer(vocab: int):
    """A word-level tokenizer over `vocab` tokens t0..t{vocab-1} (t2 ends a completion), as mlx-lm wraps one."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t3"))


def main():
    import tuning_fork  # noqa: F401  (first: on Linux CPUs it puts MKL under MLX)
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from gpu_step import SHAPES, lora_model
    from hydra import compose, initialize_config_module

    from tuning_fork import config
    from tuning_fork.objectives.grpo import GRPO, Prompt
    from tuning_fork.step import direct_cuda_launches, make_step

    shape, B, G, P, C = sys.argv[1], *map(int, sys.argv[2:6])
    checkpoint, plain = "checkpoint" in sys.argv[6:], "plain" in sys.argv[6:]
    direct = direct_cuda_launches()
    s = SHAPES[shape]
    config.register()
    with initialize_config_module("tuning_fork.conf"):
        cfg = compose("config", overrides=[
            "objective=grpo", f"objective.group_size={G}", f"objective.max_tokens={C}", "objective.beta=0.04",
            "+objective.rewards=[{_target_: tuning_fork.rewards.length, target: 100}]", f"schedule.batch_size={B}",
            f"data.max_seq_length={P + C + 1}"])
    model = lora_model(s)
    if not plain:
        from tuning_fork.layers import lean

        lean(model)
    objective = GRPO(cfg)
    objective.tokenizer = tokenizer(s["vocab_size"])
    objective.prepare(model, {}, Path(tempfile.mkdtemp()), False)
    rng = np.random.default_rng(0)
    prompts = [Prompt(rng.integers(4, min(30000, s["vocab_size"]), P).astype(np.int32), "p")
               for _ in range(B * (WARMUP + STEPS))]
    optimizer = optim.AdamW(learning_rate=1e-5)
    step, state = make_step(model, optimizer, 1, grad_checkpoint=checkpoint, loss_fn=objective.loss)
    model.train()
    times, sampling, lengths = [], [], []
    mx.reset_peak_memory()
    for k in range(WARMUP + STEPS):
        tic = time.perf_counter()
        batch = objective.rollout(prompts[k * B:(k + 1) * B], np.random.SeedSequence([0, k]))
        value, _, aux, _ = step(batch, None, True)
        mx.eval(state, value, aux)
        if k >= WARMUP:
            times.append(time.perf_counter() - tic)
            sampling.append(float(batch[-1].item()))
            lengths.append(float(aux["completion_length"].item()))
    dt = sum(times) / len(times)
    print("RESULT " + json.dumps(dict(which="tuning_fork_grpo", shape=shape, prompts=B, group=G, prompt=P,
                                      completion=C, step_s=dt, completions_s=B * G / dt,
                                      sampling_s=sum(sampling) / len(sampling), completion_length=sum(lengths) / len(lengths),
                                      peak_gb=mx.get_peak_memory() / 1e9, direct_launches=direct,
                                      grad_checkpoint=checkpoint, lean_layers=not plain)), flush=True)


if __name__ == "__main__":
    main()
