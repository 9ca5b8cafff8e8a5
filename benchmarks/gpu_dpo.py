"""One DPO training step on a random Llama-1B-like model: tuning_fork's objective=dpo step, the work of
../shared/device/dpo_trl.py (TRL's DPOTrainer with PEFT) in MLX.

LoRA rank 16 (alpha 32) on every linear of every block, bf16 weights, AdamW, β 0.1, PAIRS pairs a step of
PROMPT prompt + COMPLETION completion tokens (random), both answers of a pair in one batch of 2 x PAIRS rows,
the loss over the completions only. tuning_fork computes the reference log-probabilities once before
training (objective=dpo): the step has no reference forward. `reference_s` is what that one pass costs per
step's worth of pairs, so `pairs_s_with_reference` counts it as if it were paid again every step (TRL pays a
reference forward every step).

    python benchmarks/gpu_dpo.py PAIRS PROMPT COMPLETION [SHAPE [LOSS_CHUNK [checkpoint]]]
(LOSS_CHUNK: schedule.loss_chunk, the logits that many positions at a time; 0 or absent: all at once;
checkpoint: schedule.grad_checkpoint=true, each block's activations recomputed in the backward pass)
prints one `RESULT {json}` line.
"""

from __future__ import annotations

import json
import sys
import time

WARMUP, STEPS = 3, 10


def main():
    import tuning_fork  # noqa: F401  (first: on Linux CPUs it puts MKL under MLX)
    import mlx.core as mx
    import mlx.optimizers as optim
    from omegaconf import OmegaConf

    from tuning_fork.objectives.preference import Preference, sequence_logps
    from tuning_fork.step import HostPace, direct_cuda_launches, make_step

    sys.path.insert(0, "benchmarks")
    from gpu_step import SHAPES, lora_model

    B, P, C = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    shape = sys.argv[4] if len(sys.argv) > 4 else "1b"
    chunk = int(sys.argv[5]) if len(sys.argv) > 5 and int(sys.argv[5]) > 0 else None
    checkpoint = len(sys.argv) > 6 and sys.argv[6] == "checkpoint"
    direct = direct_cuda_launches()
    s = SHAPES[shape]
    model = lora_model(s)
    cfg = OmegaConf.create({"data": {"packing": False, "max_seq_length": P + C + 1}, "seed": 0,
                            "schedule": {"batch_size": B, "loss_chunk": chunk},
                            "objective": {"name": "dpo", "beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0}})
    objective = Preference(cfg)
    step, state = make_step(model, optim.AdamW(learning_rate=1e-5), 1, grad_checkpoint=checkpoint,
                            loss_fn=objective.loss)
    tokens = mx.random.randint(4, min(30000, s["vocab_size"]), (2 * B, P + C + 1))
    mask = mx.concatenate([mx.zeros((2 * B, P), mx.bool_), mx.ones((2 * B, C), mx.bool_)], axis=1)
    ref = mx.random.normal((2, B)) - 100.0
    batch = (tokens, mask, ref[0], ref[1])

    pace = HostPace(direct)
    for _ in range(WARMUP):
        pace.before(tokens.size)
        out = step(batch, None, True)
        mx.eval(state, out[0])
        pace.stepped(True)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for _ in range(STEPS):
        out = step(batch, None, True)
        mx.eval(state, out[0])
    dt = (time.perf_counter() - tic) / STEPS
    peak = mx.get_peak_memory() / 1e9
    model.eval()
    mx.eval(sequence_logps(model, tokens, mask))
    tic = time.perf_counter()
    for _ in range(STEPS):
        mx.eval(sequence_logps(model, tokens, mask))
    ref_s = (time.perf_counter() - tic) / STEPS
    pace.close()
    print("RESULT " + json.dumps(dict(which="tuning_fork_dpo", shape=shape, loss_chunk=chunk, grad_checkpoint=checkpoint, pairs=B, prompt=P, completion=C,
                                      step_s=dt, pairs_s=B / dt, tok_s=2 * B * (P + C) / dt, reference_s=ref_s,
                                      pairs_s_with_reference=B / (dt + ref_s), peak_gb=peak,
                                      device=str(mx.default_device()), loss=out[0].item())), flush=True)


if __name__ == "__main__":
    main()
