"""Memory-lean adapter layers for training: the same losses and gradients as mlx-lm's, with fewer saved arrays.

Two changes, both backend-neutral (Apple silicon, CPUs and CUDA alike; BENCHMARKS.md has the figures):

1. The LoRA branch in the input's precision. mlx-lm keeps the low-rank matrices in float32 and multiplies a
   bf16 input by them, which makes MLX promote the input: every adapted linear then holds a float32 copy of
   its input for the backward pass (a third of a LoRA step's activations on a bf16 Llama). `LoRALinear` casts
   the small matrices to the input's dtype instead (their gradients flow back to the float32 weights through
   the cast), as PyTorch autocast does for PEFT. Float32 models are untouched.

2. On a GPU, a SwiGLU MLP with its own VJP (`mlp`), for `down(silu(gate(x)) * up(x))` blocks whose three linears are
   LoRA (or DoRA-free, frozen) layers: the backward pass keeps the input and the gate and up projections,
   and recomputes silu, the product and the low-rank products from them, where autodiff keeps every
   intermediate (Unsloth's fast_lora.py does the like in PyTorch; the derivative of silu,
   sigmoid(g)(1 + g(1 - sigmoid(g))), is the textbook one).

Either adds the low-rank product to the frozen linear's output (and, in the VJP, its input gradient to the frozen
one's) inside one matmul (`mx.addmm`), which saves a pass over the output: +4% tokens/s on an H200 at 1B.

`lean(model)` applies both to a model with adapters attached (`schedule.lean_layers`, on by default); nothing
changes what is saved or loaded. `checkpoint_blocks` is `schedule.grad_checkpoint` (with `checkpoint_part` and
`checkpoint_layers`).
"""

from __future__ import annotations

import functools
import inspect
import sys

import mlx.core as mx
import mlx.nn as nn

from .models import import_tuner

import_tuner()  # (mlx_lm.tuner without its W&B import)
from mlx_lm.tuner.lora import LoRALinear as _LoRALinear  # noqa: E402


ADDMM = True  # y + x a b as one matmul that adds y (mx.addmm): one pass over y fewer (benchmarks/gpu_step.py +noaddmm)


def _lora(y, x, a, b, scale):
    """y + scale · x a b, the low-rank matrices cast to x's dtype."""
    if ADDMM:
        return mx.addmm(y, x @ a.astype(x.dtype), b.astype(x.dtype), alpha=scale)
    return y + (x @ a.astype(x.dtype)) @ (scale * b).astype(x.dtype)


class LoRALinear(_LoRALinear):
    """mlx-lm's LoRA layer, its low-rank product computed in the input's dtype (float32 weights kept)."""

    def __call__(self, x):
        return _lora(self.linear(x), self.dropout(x), self.lora_a, self.lora_b, self.scale)


def _base_input_grad(linear, dy):
    """dL/dx of a frozen linear (its bias has no say in it)."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.quantized_matmul(dy, linear["weight"], linear["scales"], linear.get("biases"), transpose=False,
                                   group_size=linear.group_size, bits=linear.bits, mode=linear.mode)
    return dy @ linear["weight"]


def _parts(layer):
    """(frozen linear, lora_a, lora_b, scale) of a LoRA layer; (linear, None, None, 0) of a frozen one."""
    if isinstance(layer, _LoRALinear):
        return layer.linear, layer.lora_a, layer.lora_b, layer.scale
    return layer, None, None, 0.0


def _project_grads(part, x, d):
    """For y = linear(x) (+ scale · x a b) and dL/dy = d: (dL/dx, [dL/da, dL/db] or [] for a frozen linear)."""
    linear, a, b, scale = part
    dx = _base_input_grad(linear, d)
    if a is None:
        return dx, []
    a_, b_ = a.astype(d.dtype), (scale * b).astype(d.dtype)
    xs, ds = x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1])
    db = ds @ b_.T
    grads = [(xs.T @ db).astype(a.dtype), (scale * ((xs @ a_).T @ ds)).astype(b.dtype)]
    if ADDMM:
        return mx.addmm(dx.reshape(-1, dx.shape[-1]), db, a_.T).reshape(dx.shape), grads
    return dx + (db @ a_.T).reshape(dx.shape), grads


class SwiGLU(nn.Module):
    """An MLP module whose gate_proj, up_proj and down_proj it keeps as its own children (so parameter names and
    adapter files are unchanged), trained through `mlp`; in eval mode (sampling, validation) the plain path.
    `recompute` (schedule.checkpoint_part=mlp): keep only the input, recompute gate and up in the backward pass."""

    recompute = False

    def __init__(self, mlp_module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp_module.gate_proj, mlp_module.up_proj, mlp_module.down_proj

    def __call__(self, x):
        if self.training:
            return mlp(self.gate_proj, self.up_proj, self.down_proj, x, self.recompute)
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def mlp(gate_proj, up_proj, down_proj, x, recompute: bool = False):
    """down(silu(gate(x)) * up(x)) with a VJP that keeps x, gate(x) and up(x) only; with `recompute`, x alone (gate(x)
    and up(x) are computed again in the backward pass, once its cotangent has arrived: the down projection, which
    a checkpoint of the whole MLP would also repeat, is not)."""
    layers = [_parts(m) for m in (gate_proj, up_proj, down_proj)]
    trainable = [p for (_, a, b, _) in layers if a is not None for p in (a, b)]

    def project(i, h):
        linear, a, b, scale = layers[i]
        return linear(h) if a is None else _lora(linear(h), h, a, b, scale)

    @mx.custom_function
    def f(x, *weights):
        g, u = project(0, x), project(1, x)
        return (project(2, nn.silu(g) * u),) + (() if recompute else (g, u))

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        x, dy = primals[0], cotangents[0]
        if recompute:
            later = mx.depends(x, dy)  # (not before the backward pass reaches this MLP)
            g, u = project(0, later), project(1, later)
        else:
            g, u = outputs[1:3]
        sig = mx.sigmoid(g)
        silu = g * sig
        dh, down = _project_grads(layers[2], silu * u, dy)
        dx_gate, gate = _project_grads(layers[0], x, dh * u * sig * (1 + g * (1 - sig)))
        dx_up, up = _project_grads(layers[1], x, dh * silu)
        return (dx_gate + dx_up, *gate, *up, *down)

    return f(x, *trainable)[0]


@functools.cache
def is_swiglu(cls) -> bool:
    """Whether an mlx-lm module class computes down_proj(swiglu(gate_proj(x), up_proj(x))) and nothing else (read
    from its source: llama, mistral, qwen2, qwen3, deepseek, olmo2 and some fifty other mlx-lm models)."""
    try:
        source = inspect.getsource(cls.__call__)
        from mlx_lm.models.activations import swiglu
    except (OSError, TypeError, ImportError):
        return False
    body = [line.strip() for line in source.splitlines()[1:] if line.strip() and not line.strip().startswith("#")]
    return (source.lstrip().startswith("def __call__(self, x)") and getattr(sys.modules[cls.__module__], "swiglu", None)
            is swiglu and body == ["return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))"])


def _replaceable(module, dropout: float) -> bool:
    """A SwiGLU MLP with LoRA on at least one projection, no dropout, and LoRA or frozen linears (not DoRA)."""
    if not is_swiglu(type(module)) or dropout:
        return False
    parts = [getattr(module, k, None) for k in ("gate_proj", "up_proj", "down_proj")]
    return (all(isinstance(p, (_LoRALinear, nn.Linear, nn.QuantizedLinear)) for p in parts)
            and any(isinstance(p, _LoRALinear) for p in parts))


def lean(model, dropout: float = 0.0, mlps: bool | None = None) -> dict:
    """Swap in the lean layers where they apply; returns how many of each were swapped. The MLPs only without
    adapter dropout, and if `mlps` (default: on a GPU, Metal or CUDA; on a CPU the exponentials the backward pass
    recomputes cost more than matmuls there: a float32 step ~10% slower for 10% less memory, BENCHMARKS.md)."""
    if mlps is None:
        mlps = mx.default_device() == mx.gpu
    counts = {"lora": 0, "mlp": 0}
    for _, module in model.named_modules():
        if type(module) is _LoRALinear:
            module.__class__ = LoRALinear
            counts["lora"] += 1
    for _, module in model.named_modules() if mlps else ():
        for name, child in module.children().items():
            if isinstance(child, nn.Module) and _replaceable(child, dropout):
                setattr(module, name, SwiGLU(child))
                counts["mlp"] += 1
    return counts


_keys: list = []  # the key of each checkpointed call being traced, innermost last


class _KeyedDropout(nn.Dropout):
    """nn.Dropout whose mask, inside a checkpointed call, is drawn from that call's key (a Bernoulli(1 - p) draw,
    kept values scaled by 1 / (1 - p), as nn.Dropout), so that recomputing the call draws the same mask."""

    def __call__(self, x):
        keep = self._p_1  # (nn.Dropout keeps 1 - p here)
        if not _keys or not self.training or keep == 1.0:
            return super().__call__(x)
        _keys[-1], key = mx.random.split(_keys[-1])
        return (mx.random.bernoulli(keep, x.shape, key=key) * x) * (1 / keep)


@functools.cache
def _checkpointed(cls):
    """A subclass of a module class (a block, or its attention or MLP) whose call goes through mx.checkpoint in
    training mode. The call's dropout (adapter dropout: _KeyedDropout) draws from a key of its own, which the
    checkpointed function keeps, so the backward pass recomputes the very masks the forward pass used (a plain
    mx.checkpoint, mlx-lm's grad_checkpoint among them, draws new ones: the gradients of another function than
    the loss)."""

    def __call__(self, x, *args, **kwargs):
        if not self.training:  # sampling with a KV cache through mx.checkpoint crawled on CUDA (GRPO, session 6)
            return cls.__call__(self, x, *args, **kwargs)

        key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)  # a key (two words) from the run's sequence

        def inner(params, x):  # (the recomputation calls it again: the same key, the same masks)
            self.update(params)
            _keys.append(key)
            try:
                return cls.__call__(self, x, *args, **kwargs)
            finally:
                _keys.pop()

        return mx.checkpoint(inner)(self.trainable_parameters(), x)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__, "checkpointed": True})


ATTENTION = ("self_attn", "attention", "attn")  # what mlx-lm's families call a block's attention and MLP
MLP = ("mlp", "feed_forward")
PARTS = ("block", "attention", "mlp")


def checkpoint_blocks(model, part: str = "block", layers: int | None = None) -> int:
    """Recompute activations in the backward pass (schedule.grad_checkpoint): `part` of each of the first `layers`
    blocks (None: all) keeps only its input, and its call is recomputed in the backward pass. "block": the whole
    block; "attention" or "mlp": that half alone (its own norm and residual stay plain), for a smaller saving at
    a smaller cost in speed (Korthikanti et al., 2022, "Reducing Activation Recomputation in Large Transformer
    Models", recompute a part of each block; BENCHMARKS.md has the figures). The modules become a subclass
    whose call goes through mx.checkpoint in training mode; in eval mode (sampling, validation) they run
    plainly. Other models of the same class are untouched (mlx-lm's wrapper patches the class itself). The
    model's dropout modules become _KeyedDropout, so that a recomputed call draws its forward pass's masks.
    Returns how many modules are checkpointed; a model whose blocks have no such part is a ConfigError."""
    from .errors import ConfigError

    if part not in PARTS:
        raise ConfigError(f"schedule.checkpoint_part={part}: unknown: use {', '.join(PARTS)}")
    count = 0
    for block in list(model.layers)[:layers]:
        if part == "block":
            module = block
        else:
            names = ATTENTION if part == "attention" else MLP
            module = next((getattr(block, n) for n in names if isinstance(getattr(block, n, None), nn.Module)), None)
            if module is None:
                raise ConfigError(f"schedule.checkpoint_part={part}: this model's blocks ({type(block).__name__}) have "
                                  f"no {' or '.join(names)} module; use schedule.checkpoint_part=block")
        if isinstance(module, SwiGLU):  # its own VJP recomputes gate and up alone
            module.recompute = True
        elif not getattr(type(module), "checkpointed", False):
            module.__class__ = _checkpointed(type(module))
        count += 1
    for _, module in model.named_modules():
        if type(module) is nn.Dropout:
            module.__class__ = _KeyedDropout
    return count
