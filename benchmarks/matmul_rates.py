"""The bf16 matmuls of one LoRA step at benchmarks/gpu_step.py's shapes, timed in MLX and in PyTorch on the same GPU:
how much of the gap to a PyTorch peer (Unsloth) is the matrix-multiply library rather than the step around it.

Every frozen projection of a block runs twice a step: forward, y = x W^T (tokens x in -> out), and for the
input gradient, dx = dy W (tokens x out -> in); the head (tied or not) likewise. Each product is timed alone
(20 runs queued after 3 warm-ups, then one wait) at the step's token count; the per-step sum weights each by how often a step runs it.

    python benchmarks/matmul_rates.py {mlx|torch} {1b|8b} TOKENS        # one RESULT {json} line
"""

from __future__ import annotations

import json
import sys
import time

from gpu_step import SHAPES

RUNS, WARMUP = 20, 3


def products(s: dict, tokens: int) -> list[tuple[str, int, int, int, int]]:
    """(name, M, K, N, times a step) of every big matmul: forward x W^T and input gradient dy W."""
    d, f, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    q, kv = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
    out = []
    for name, k, n in (("q", d, q), ("k|v", d, kv), ("o", q, d), ("gate|up", d, f), ("down", f, d), ("head", d, V)):
        times = (1 if name == "head" else L) * (2 if name in ("k|v", "gate|up") else 1)
        out += [(f"{name} forward", tokens, k, n, times), (f"{name} input grad", tokens, n, k, times)]
    return out


def timed(run, sync) -> float:
    for _ in range(WARMUP):
        run()
    sync()
    tic = time.perf_counter()
    for _ in range(RUNS):
        run()
    sync()
    return (time.perf_counter() - tic) / RUNS


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("mlx", "torch") or sys.argv[2] not in SHAPES or not sys.argv[3].isdigit():
        sys.exit(f"usage: matmul_rates.py {{mlx|torch}} {{{'|'.join(SHAPES)}}} TOKENS")
    lib, shape, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rows, total_s, flops = [], 0.0, 0.0
    for name, m, k, n, times in products(SHAPES[shape], tokens):
        forward = name.endswith("forward")
        if lib == "mlx":
            import mlx.core as mx

            a = mx.random.normal((m, k)).astype(mx.bfloat16)
            w = mx.random.normal((n, k) if forward else (k, n)).astype(mx.bfloat16)  # stored (out, in), as nn.Linear
            mx.eval(a, w)
            # queued without waiting, as PyTorch's calls are (and as the compiled step runs them)
            run = (lambda: mx.async_eval(a @ w.T)) if forward else (lambda: mx.async_eval(a @ w))
            sync = mx.synchronize
        else:
            import torch

            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn((n, k) if forward else (k, n), device="cuda", dtype=torch.bfloat16)
            run = (lambda: torch.nn.functional.linear(a, w)) if forward else (lambda: a @ w)
            sync = torch.cuda.synchronize
        dt = timed(run, sync)
        rows.append(dict(name=name, m=m, k=k, n=n, times=times, ms=dt * 1e3, tflops=2 * m * k * n / dt / 1e12))
        total_s += dt * times
        flops += 2 * m * k * n * times
    print("RESULT " + json.dumps(dict(lib=lib, shape=shape, tokens=tokens, step_matmul_ms=total_s * 1e3,
                                      tflops=flops / total_s / 1e12, products=rows)), flush=True)


if __name__ == "__main__":
    main()
