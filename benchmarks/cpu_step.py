"""One LoRA training step of the built-in model on the CPU: MKL (tuning_fork's default on x86-64 Linux)
vs the reference BLAS that mlx[cpu]'s Linux wheel bundles.

    python benchmarks/cpu_step.py                                # MKL loaded by `import tuning_fork`
    TUNING_FORK_BLAS=reference python benchmarks/cpu_step.py     # mlx's bundled BLAS
"""

import os
import time
from functools import partial

import tuning_fork  # noqa: F401  (loads MKL before mlx, unless TUNING_FORK_BLAS=reference)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_lm import load
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers

from tuning_fork.models import tiny_model_path

model, _ = load(str(tiny_model_path()))
model.freeze()
linear_to_lora_layers(model, 2, {"rank": 32, "scale": 2.0, "dropout": 0.0})
opt = optim.Adam(learning_rate=1e-3)
lvg = nn.value_and_grad(model, default_loss)
state = [model.state, opt.state, mx.random.state]


@partial(mx.compile, inputs=state, outputs=state)
def step(batch, lengths):
    (loss, _), grad = lvg(model, batch, lengths)
    opt.update(model, grad)
    return loss


B, T = 8, 65
batch = mx.random.randint(0, 512, (B, T))
lengths = mx.array([[0, T - 1]] * B)
for _ in range(3):
    mx.eval(step(batch, lengths), state)
n = 20
tic = time.perf_counter()
for _ in range(n):
    mx.eval(step(batch, lengths), state)
dt = (time.perf_counter() - tic) / n
print(f"BLAS={os.environ.get('TUNING_FORK_BLAS', 'mkl')} step {dt * 1000:.1f} ms, {B * (T - 1) / dt:,.0f} tok/s")
