"""One LoRA training step on Llama-like shapes with random bf16 weights: tuning_fork's step vs mlx-lm's.

LoRA rank 16 (alpha 32) on every linear of every block, random tokens, Adam. Variants:
  mlx_lm        mlx-lm's default_loss in a step compiled the way mlx-lm's trainer compiles it
  tuning_fork   as tuning_fork/train.py runs it: tuning_fork.step.make_step (our masked loss, the same
                compiled update), the lean layers (tuning_fork/layers.py: LoRA branches in bf16, SwiGLU MLPs
                with their own VJP), kernels launched directly on CUDA (step.direct_cuda_launches) and the
                host paced by a memory limit set from the first step (step.HostPace)
  plain         the same without the lean layers (mlx-lm's LoRA layers: schedule.lean_layers=false)
  graphs        our step under MLX's own launch settings (a CUDA graph per 20 kernels), no pacing
  chunked[N]    the same, with the logits computed N positions at a time (schedule.loss_chunk=N, default 256)
  bucketed[MB]  our step with gradients averaged in buckets of MB (default 8) taken last layer first
                (step.reduce_gradients) on the default stream, instead of mlx's average_gradients
  streamed[MB]  the same, the all-reduces on a stream of their own, beside the backward pass (what
                schedule.reduce_bucket_mb=MB does on a GPU)
Any variant but mlx_lm takes `+ckpt` (schedule.grad_checkpoint=true: each block recomputed in the backward pass),
`+ckptattn` / `+ckptmlp` (schedule.checkpoint_part=attention / mlp: that half of each block only), `+plain` (no
lean layers), `+nomlp` (no SwiGLU VJP), `+noaddmm` (the LoRA sum as a matmul, then an add), `+flat` / `+noflat`
(step.flat_update on / off; by default on with several ranks), e.g. `tuning_fork+ckpt`, `chunked128+ckptmlp`.
Under `mlx.launch -n 2 --backend nccl` every rank runs BATCH x SEQ and gradients are averaged: the
tokens/s printed is the global figure. Model FLOPs per token follow the reference measurement in
../shared/device/peer_bench_lora.py (forward + input-gradient backward; frozen weights get no weight grads).

    python benchmarks/gpu_step.py {mlx_lm|tuning_fork|plain|graphs|chunked[N]|bucketed[MB]}[+ckpt][+plain] {1b|8b|1b_v32k|smoke|smoke_v16k|cpu_f32} BATCH SEQ
prints one `RESULT {json}` line (rank 0). Two settings separate the step from what the CLI's loop adds
(issue 18's breakdown): BENCH_MODEL=FOLDER loads the weights from a saved model (mlx_lm.load, as the CLI
does) instead of building them in memory; BENCH_FRESH=1 makes every step's batch anew from NumPy (as
data.collate does) instead of reusing one. BENCH_STEPS=N times N steps (default 10); BENCH_BARRIER=PREFIX:N waits,
after the warm-up, until N processes have written PREFIX.<pid> (independent processes timed together, issue 23);
BENCH_NOREDUCE=1 leaves out the gradients' all-reduce (ranks launched together, each applying its own gradients:
what the rest of a distributed step costs); BENCH_NOREDUCE=ordered leaves it out but has every update wait for
every gradient, as the all-reduce does; BENCH_NOREDUCE=concat adds average_gradients' concatenation and split
(issue 23: what the updates' place costs, apart from communication). BENCH_ALLRANKS=1: every rank prints.
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import partial

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, head_dim=64, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, head_dim=128, tie_word_embeddings=False),
    "1b_v32k": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32000, head_dim=64, tie_word_embeddings=True),  # the head's share
    "smoke_v16k": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=16000, head_dim=16, tie_word_embeddings=True),
    # a small float32 model for the CPU (issue 18's CPU goal): activations, not logits, set the peak
    "cpu_f32": dict(hidden_size=512, num_hidden_layers=4, intermediate_size=2048, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=8000, head_dim=64, tie_word_embeddings=True, dtype="float32"),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, head_dim=16, tie_word_embeddings=True),  # CPU check
}
PEAK_TFLOPS = 790
WARMUP, STEPS = 3, 10


def flops_per_token(s, seq):
    d, L, f, V = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"], s["vocab_size"]
    kv, q = s["num_key_value_heads"] * s["head_dim"], s["num_attention_heads"] * s["head_dim"]
    n = L * (d * q + d * kv * 2 + q * d + 3 * d * f) + d * V
    attn = L * 2 * 2 * seq * q / 2
    return 2 * (2 * n + attn)


def lora_model(s: dict):
    """A random bf16 Llama of shape `s` with LoRA rank 16 (scale 2.0: alpha 32) on every linear of every block."""
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    s = dict(s)
    dtype = getattr(mx, s.pop("dtype", "bfloat16"))
    model = llama.Model(llama.ModelArgs.from_dict(dict(model_type="llama", rms_norm_eps=1e-5,
                                                       rope_theta=500000.0, **s)))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    model.freeze()
    linear_to_lora_layers(model, s["num_hidden_layers"], {"rank": 16, "scale": 2.0, "dropout": 0.0})
    return model


def main():
    import tuning_fork  # noqa: F401  (first: on Linux CPUs it puts MKL under MLX)
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss

    from tuning_fork import step as steps
    from tuning_fork.step import HostPace, direct_cuda_launches, make_step

    mode = os.environ.get("BENCH_NOREDUCE")
    if mode not in (None, "", "1", "ordered", "concat"):
        sys.exit(f"gpu_step: BENCH_NOREDUCE={mode!r}: use 1, ordered or concat")
    if mode == "ordered":  # no all-reduce, but every update waits for every gradient
        def ordered(grad, *args):
            from mlx.utils import tree_flatten, tree_unflatten

            flat = tree_flatten(grad)
            arrays = mx.depends([a for _, a in flat], [a for _, a in flat])
            return tree_unflatten(list(zip([k for k, _ in flat], arrays)))
        steps.reduce_gradients = ordered
    elif mode == "concat":  # no all-reduce, but average_gradients' concatenate and split
        def concat(grad, *args):
            from mlx.utils import tree_flatten, tree_unflatten

            flat = tree_flatten(grad)
            big = mx.concatenate([a.reshape(-1) for _, a in flat]) * 1.0
            out, at = [], 0
            for k, a in flat:
                out.append((k, big[at:at + a.size].reshape(a.shape)))
                at += a.size
            return tree_unflatten(out)
        steps.reduce_gradients = concat
    elif mode:
        steps.reduce_gradients = lambda grad, *args: grad

    variant, shape, B, T = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    variant, *flags = variant.split("+")
    if variant == "plain":
        variant, flags = "tuning_fork", flags + ["plain"]
    parts = {"ckpt": "block", "ckptattn": "attention", "ckptmlp": "mlp"}
    if set(flags) - {"plain", "nomlp", "noaddmm", "flat", "noflat", *parts} or flags and variant == "mlx_lm" or len(set(flags) & set(parts)) > 1:
        sys.exit(f"gpu_step: unknown flags {flags}: +ckpt (or +ckptattn, +ckptmlp), +plain, +nomlp, +noaddmm, +flat, "
                 "+noflat (not for mlx_lm)")
    if variant not in ("mlx_lm", "tuning_fork", "graphs") and not variant.startswith(("chunked", "bucketed", "streamed")):
        sys.exit(f"gpu_step: unknown variant {variant!r}: mlx_lm, tuning_fork, graphs, chunked[N], bucketed[MB], "
                 "streamed[MB]")
    if shape not in SHAPES:
        sys.exit(f"gpu_step: unknown shape {shape!r}: {', '.join(SHAPES)}")
    direct = variant not in ("mlx_lm", "graphs") and direct_cuda_launches()  # before the first kernel
    group = mx.distributed.init()
    s = SHAPES[shape]
    if os.environ.get("BENCH_MODEL"):
        from mlx_lm import load
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model, _ = load(os.environ["BENCH_MODEL"])
        model.freeze()
        linear_to_lora_layers(model, s["num_hidden_layers"], {"rank": 16, "scale": 2.0, "dropout": 0.0})
    else:
        model = lora_model(s)
    opt = optim.Adam(learning_rate=1e-5)
    tokens = mx.random.randint(0, s["vocab_size"], (B, T + 1))

    if variant == "mlx_lm":
        lvg = nn.value_and_grad(model, default_loss)
        state = [model.state, opt.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(batch, lengths):
            (value, toks), grad = lvg(model, batch, lengths)
            grad = nn.average_gradients(grad)
            opt.update(model, grad)
            return value, toks

        args = (tokens, mx.array([[0, T]] * B))
        run = lambda: step(*args)
    else:
        chunk = int(variant[len("chunked"):] or 256) if variant.startswith("chunked") else None
        bucket, stream = 0, None
        for kind in ("bucketed", "streamed"):
            if variant.startswith(kind):
                bucket = float(variant[len(kind):] or 8)
                stream = mx.new_stream(mx.default_device()) if kind == "streamed" else mx.default_stream(mx.default_device())
        if "plain" not in flags:
            from tuning_fork import layers
            from tuning_fork.layers import lean

            layers.ADDMM = "noaddmm" not in flags
            lean(model, mlps=False if "nomlp" in flags else None)  # (None: as the CLI, the MLPs on a GPU only)
        part = next((parts[f] for f in flags if f in parts), None)
        step, state = make_step(model, opt, 1, grad_checkpoint=part is not None, loss_chunk=chunk, bucket_mb=bucket,
                                comm_stream=stream, checkpoint_part=part or "block",
                                flat=True if "flat" in flags else False if "noflat" in flags else None)
        batch = (tokens, mx.ones((B, T), dtype=mx.bool_))
        if os.environ.get("BENCH_FRESH"):
            import numpy as np

            rng = np.random.default_rng(0)
            fresh = lambda: (mx.array(rng.integers(0, s["vocab_size"], (B, T + 1)).astype(np.int32)),
                             mx.array(np.ones((B, T), bool)))
            run = lambda: step(fresh(), None, True)[:2]
        else:
            run = lambda: step(batch, None, True)[:2]

    pace = HostPace(os.environ["BENCH_PACE"] == "1" if "BENCH_PACE" in os.environ else direct)  # BENCH_PACE=0|1: pacing off|on
    for k in range(WARMUP):
        tic = time.perf_counter()
        pace.before(B * T)
        value, _ = run()
        mx.eval(state, value)
        pace.stepped(True)
        if os.environ.get("BENCH_VERBOSE"):
            print(f"warm-up step {k}: {time.perf_counter() - tic:.2f} s, peak {mx.get_peak_memory() / 1e9:.2f} GB",
                  flush=True)
    if os.environ.get("BENCH_BARRIER"):
        import glob

        prefix, count = os.environ["BENCH_BARRIER"].rsplit(":", 1)
        open(f"{prefix}.{os.getpid()}", "w").close()
        while len(glob.glob(f"{prefix}.*")) < int(count):
            time.sleep(0.01)
    steps = int(os.environ.get("BENCH_STEPS", STEPS))
    mx.reset_peak_memory()
    tic, times = time.perf_counter(), []
    for _ in range(steps):
        t0 = time.perf_counter()
        value, _ = run()
        mx.eval(state, value)
        times.append(time.perf_counter() - t0)
    dt = (time.perf_counter() - tic) / steps
    times.sort()
    tok_s = group.size() * B * T / dt
    fpt = flops_per_token(s, T)
    result = dict(variant="+".join([variant, *flags]), shape=shape, batch=B, seq=T, ranks=group.size(), device=str(mx.default_device()),
                  step_s=dt, tok_s=tok_s, tflops=tok_s * fpt / 1e12 / group.size(),
                  mfu=tok_s * fpt / 1e12 / group.size() / PEAK_TFLOPS, peak_gb=mx.get_peak_memory() / 1e9,
                  launches="direct" if direct else "graphs" if mx.cuda.is_available() else None,
                  loss=value.item(), loaded=bool(os.environ.get("BENCH_MODEL")), fresh=bool(os.environ.get("BENCH_FRESH")),
                  step_ms=[round(1e3 * times[i], 2) for i in (0, len(times) // 2, -1)], rank=group.rank())
    if group.rank() == 0 or os.environ.get("BENCH_ALLRANKS"):
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
