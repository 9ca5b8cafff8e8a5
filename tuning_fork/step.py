"""The training step: the masked loss (packed rows included), the compiled update, and the optimizer.

A batch is `(tokens, mask)`, or `(tokens, mask, segments)` for packed rows (see data.collate*). The loss
counts the targets `mask` marks and nothing else: padding never trains (mlx-lm's default loss also counts
the padding token after each record).

Packed rows keep attention inside each record with a block-diagonal causal mask. mlx-lm's models take
their attention mask from the cache (`cache.make_mask`), so a stand-in cache that stores nothing hands
every layer our mask: one mechanism for every model family that follows mlx-lm's cache protocol. Positions
run on across a row; RoPE scores depend only on the distance between tokens, so a record scores exactly
as it would alone (tests/test_packing.py).
"""

from __future__ import annotations

import os
from functools import partial


class RecordMask:
    """A per-layer 'cache' that keeps nothing and masks attention to the current record (and the past)."""

    offset = 0

    def __init__(self, segments):
        self.segments = segments

    def update_and_fetch(self, keys, values):
        return keys, values

    def make_mask(self, n, return_array=False, window_size=None):
        import mlx.core as mx

        seg = self.segments[:, :n]
        pos = mx.arange(n)
        causal = pos[:, None] >= pos[None, :]
        if window_size is not None:
            causal = causal & (pos[:, None] - pos[None, :] < window_size)
        return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def loss(model, tokens, mask, segments=None, chunk: int | None = None):
    """Mean cross-entropy over the targets `mask` marks, and how many there were.

    `chunk`: compute the logits `chunk` positions at a time, recomputed in the backward pass, so the
    full (batch, length, vocabulary) logits never exist at once (see chunked_cross_entropy)."""
    import mlx.core as mx
    import mlx.nn as nn

    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    cache = None if segments is None else [RecordMask(segments[:, :-1]) for _ in model.layers]
    ntoks = mask.sum()
    denominator = mx.maximum(ntoks, 1)  # a batch with no target token has loss 0, never 0/0
    head = output_head(model) if chunk else None
    if head is not None:
        hidden = model.model(inputs, cache=cache)
        return chunked_cross_entropy(head, hidden, targets, mask, chunk, model.training) / denominator, ntoks
    logits = model(inputs, cache=cache)
    ce = nn.losses.cross_entropy(logits, targets) * mask
    return ce.astype(mx.float32).sum() / denominator, ntoks


def with_tokens(loss_fn):
    """A (loss, weight) function as an objective's loss: (loss, weight, {"tokens": the target tokens})."""

    def wrapped(model, *batch):
        value, ntoks = loss_fn(model, *batch)
        return value, ntoks, {"tokens": ntoks}

    return wrapped


PLAIN_HEADS = ("llama", "mistral", "qwen2", "qwen3")  # logits = head(model.model(x)), nothing after the head


def output_head(model):
    """The module that turns hidden states into logits, for model families whose logits are exactly
    that (no soft-capping or scaling after the head); None for any other."""
    if getattr(model, "model_type", None) not in PLAIN_HEADS or not hasattr(model, "model"):
        return None
    if getattr(model, "lm_head", None) is not None:
        return model.lm_head
    return model.model.embed_tokens


def chunked_cross_entropy(head, hidden, targets, mask, chunk: int, training: bool = True):
    """The summed cross-entropy, `chunk` positions at a time, so that the (positions x vocabulary) logits
    never exist at once. A plain head (a Linear without bias, or a tied Embedding) gets a cross-entropy with
    its own VJP: while training with the head frozen (LoRA), eager_cross_entropy (the gradient computed with
    the loss, nothing recomputed); otherwise lse_cross_entropy (it keeps only each position's log-sum-exp and
    recomputes a chunk's logits in the backward pass). Any other head (quantized, say) recomputes each
    chunk's logits through nn.utils.checkpoint. Either way the head's weights get their gradient when they
    train."""
    import mlx.core as mx
    import mlx.nn as nn

    plain = type(head) in (nn.Linear, nn.Embedding) and "bias" not in head
    if plain:
        n = hidden.shape[0] * hidden.shape[1]
        frozen = "weight" not in head.trainable_parameters()
        f = eager_cross_entropy(chunk) if training and frozen else lse_cross_entropy(chunk)
        return f(hidden.reshape(n, -1), head.weight, targets.reshape(n), mask.reshape(n).astype(mx.float32))[0]
    project = head.as_linear if isinstance(head, nn.Embedding) else head

    def piece(t, m):  # targets and mask are constants of the checkpointed function: no gradient for them
        return nn.utils.checkpoint(head, lambda h: (nn.losses.cross_entropy(project(h), t) * m)
                                   .astype(mx.float32).sum())

    total = mx.array(0.0)
    for i in range(0, hidden.shape[1], chunk):
        total = total + piece(targets[:, i:i + chunk], mask[:, i:i + chunk])(hidden[:, i:i + chunk])
    return total


def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + chunk)) for i in range(0, n, chunk)]


def _in_order(x, previous):
    """x, once `previous` is computed: chunk by chunk, where MLX would be free to hold every chunk's logits at once."""
    import mlx.core as mx

    return x if previous is None else mx.depends(x, previous)


def _chunk_loss(h, w, t, m):
    """A chunk's float32 logits h w^T, their log-sum-exp per position, and the chunk's summed cross-entropy weighted
    by m."""
    import mlx.core as mx

    logits = (h @ w.T).astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)
    picked = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return logits, lse, ((lse - picked) * m).sum()


def lse_cross_entropy(chunk: int):
    """f(h, w, t, m) -> (sum of m * (logsumexp(h w^T) - (h w^T)[t]), the log-sum-exp of each position), with
    a VJP that recomputes each chunk's logits from h and w and the saved log-sum-exp: d logits = softmax -
    onehot(t), scaled by the mask (the cut cross-entropy idea: Wijmans et al., 2024, "Cut Your Losses in
    Large-Vocabulary Language Models"). h: (n, d) hidden states, w: (V, d) the head, t: (n,) targets,
    m: (n,) float weights."""
    import mlx.core as mx

    @mx.custom_function
    def f(h, w, t, m):
        total, lses = mx.array(0.0), []
        for a, b in _spans(h.shape[0], chunk):
            _, lse, part = _chunk_loss(_in_order(h[a:b], lses[-1] if lses else None), w, t[a:b], m[a:b])
            total = total + part
            lses.append(lse)
        return total, mx.concatenate(lses)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        h, w, t, m = primals
        g, lse = cotangents[0], outputs[1]
        dh, dw = [], mx.zeros(w.shape, mx.float32)
        for a, b in _spans(h.shape[0], chunk):
            logits = (_in_order(h[a:b], dh[-1] if dh else None) @ w.T).astype(mx.float32)
            d = mx.exp(logits - lse[a:b, None])
            d = d - (mx.arange(w.shape[0])[None] == t[a:b, None])
            d = (d * (m[a:b] * g)[:, None]).astype(h.dtype)
            dh.append(d @ w)
            dw = dw + (d.T @ h[a:b]).astype(mx.float32)
        return mx.concatenate(dh), dw.astype(w.dtype), mx.zeros_like(t), mx.zeros_like(m)

    return f


def eager_cross_entropy(chunk: int):
    """f(h, w, t, m) -> (sum of m * (logsumexp(h w^T) - (h w^T)[t]), its gradient with respect to h), for a head w
    that does not train: each chunk's logits are computed once, and the gradient (softmax - onehot(t)) w,
    weighted by m, beside the loss, so the backward pass only scales it by the loss's cotangent (Liger-Kernel's
    fused linear cross-entropy does the same). It keeps (n, d) numbers, not (n, V), and recomputes nothing.
    w gets a zero gradient: use lse_cross_entropy where it trains."""
    import mlx.core as mx

    @mx.custom_function
    def f(h, w, t, m):
        total, grads = mx.array(0.0), []
        for a, b in _spans(h.shape[0], chunk):
            logits, lse, part = _chunk_loss(_in_order(h[a:b], grads[-1] if grads else None), w, t[a:b], m[a:b])
            total = total + part
            d = mx.exp(logits - lse[:, None]) - (mx.arange(w.shape[0])[None] == t[a:b, None])
            grads.append((d * m[a:b, None]).astype(h.dtype) @ w)
        return total, mx.concatenate(grads)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        h, w, t, m = primals
        return (cotangents[0] * outputs[1]).astype(h.dtype), mx.zeros_like(w), mx.zeros_like(t), mx.zeros_like(m)

    return f


def token_logps(model, tokens, chunk: int | None = None):
    """log π(tokens[:, t + 1] | tokens[:, :t + 1]) at every position: (rows, width - 1), float32. With `chunk` and a
    plain head (output_head), `chunk` positions at a time with a VJP of its own (chunked_logps), so the
    (positions x vocabulary) logits never exist at once; otherwise from the whole logits."""
    import mlx.core as mx
    import mlx.nn as nn

    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    head = output_head(model) if chunk else None
    if head is None or type(head) not in (nn.Linear, nn.Embedding) or "bias" in head:
        return -nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets)
    hidden = model.model(inputs)
    rows, cols = targets.shape
    return chunked_logps(chunk)(hidden.reshape(rows * cols, -1), head.weight, targets.reshape(-1))[0].reshape(rows, cols)


def chunked_logps(chunk: int):
    """f(h, w, t) -> (log softmax(h w^T)[t] per position,), computed `chunk` positions at a time; its VJP recomputes
    each chunk's logits: d logits = g (onehot(t) - softmax). The per-token sibling of lse_cross_entropy."""
    import mlx.core as mx

    @mx.custom_function
    def f(h, w, t):
        out = []
        for a, b in _spans(h.shape[0], chunk):
            logits = (_in_order(h[a:b], out[-1] if out else None) @ w.T).astype(mx.float32)
            out.append(mx.take_along_axis(logits, t[a:b, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1))
        return (mx.concatenate(out),)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        h, w, t = primals
        g = cotangents[0]
        dh, dw = [], mx.zeros(w.shape, mx.float32)
        for a, b in _spans(h.shape[0], chunk):
            logits = (_in_order(h[a:b], dh[-1] if dh else None) @ w.T).astype(mx.float32)
            d = (mx.arange(w.shape[0])[None] == t[a:b, None]) - mx.softmax(logits, axis=-1)
            d = (d * g[a:b, None]).astype(h.dtype)
            dh.append(d @ w)
            dw = dw + (d.T @ h[a:b]).astype(mx.float32)
        return mx.concatenate(dh), dw.astype(w.dtype), mx.zeros_like(t)

    return f


BUCKET_MB = 0  # > 0: gradients averaged across ranks in buckets of about this size (see reduce_gradients)


def reduce_gradients(grad, bucket_mb: float = BUCKET_MB, stream=None):
    """The mean of `grad` across data-parallel ranks, in buckets taken last layer first.

    The backward pass produces the last layers' gradients first, so their buckets can be summed while
    the earlier layers' are still being computed (mlx's average_gradients packs the tree in model order,
    first layer first, in 32 MB buckets: the first all-reduce waits for the whole backward pass). Each
    element is summed across ranks exactly as one all-reduce sums it: the results are identical
    (tests/test_distributed.py). On a GPU, make_step puts them on a stream of their own, so that they run
    beside the backward pass: on two H200s at 1B, +3.3% over mlx's average_gradients in the same call, where
    the same buckets on the default stream ran 1.2% faster than it and, in another call, 3% slower
    (BENCHMARKS.md). `bucket_mb <= 0` (the default, until more GPUs measure it): mlx's average_gradients."""
    import mlx.core as mx
    from mlx.nn.utils import average_gradients
    from mlx.utils import tree_flatten, tree_unflatten

    group = mx.distributed.init()
    n = group.size()
    if n == 1:
        return grad
    if bucket_mb <= 0:
        return average_gradients(grad)
    flat = tree_flatten(grad)
    limit, buckets, filling = bucket_mb * 2**20, [], {}  # filling: a bucket per dtype, (indices, bytes)
    for i in reversed(range(len(flat))):
        a = flat[i][1]
        indices, size = filling.pop(a.dtype, ([], 0))
        indices.append(i)
        if size + a.nbytes >= limit:
            buckets.append(indices)
        else:
            filling[a.dtype] = (indices, size + a.nbytes)
    buckets += [indices for indices, _ in filling.values()]
    out = [None] * len(flat)
    for bucket in buckets:
        arrays = [flat[i][1] for i in bucket]
        summed = mx.distributed.all_sum(mx.concatenate([a.reshape(-1) for a in arrays]), stream=stream) / n
        at = 0
        for i, a in zip(bucket, arrays):
            out[i] = (flat[i][0], summed[at:at + a.size].reshape(a.shape))
            at += a.size
    return tree_unflatten(out)


FLAT_KEY = "__flat__"  # optimizer.state's entry for flat_update's concatenated state
FLAT_MAX_BYTES = 2**30  # above this (full fine-tuning), the flat copies would cost more memory than launches save


def elementwise(optimizer) -> bool:
    """Whether `optimizer` updates each element from that element alone (Adam, AdamW, SGD, Lion, ...): then
    one update over the concatenated parameters equals the per-parameter updates. Adafactor (factored second
    moments) and Muon (orthogonalized matrices) work on whole matrices."""
    import mlx.optimizers as optim

    return isinstance(optimizer, (optim.SGD, optim.Adam, optim.RMSprop, optim.Adagrad, optim.AdaDelta, optim.Lion))


def use_flat_update(model, optimizer, bucket_mb: float = BUCKET_MB) -> bool:
    """flat_update for this run: several ranks, mlx's all-reduce (no buckets), an elementwise optimizer and
    adapter-sized trainable weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if mx.distributed.init().size() == 1 or bucket_mb > 0 or not elementwise(optimizer):
        return False
    return sum(a.nbytes for _, a in tree_flatten(model.trainable_parameters())) <= FLAT_MAX_BYTES


def _flat_groups(model):
    """The trainable weights as tree_flatten lists them, and their indices grouped by dtype."""
    from mlx.utils import tree_flatten

    flat = tree_flatten(model.trainable_parameters())
    groups: dict[str, list[int]] = {}
    for i, (_, a) in enumerate(flat):
        groups.setdefault(str(a.dtype).split(".")[-1], []).append(i)
    return flat, groups


def _cat(arrays):
    import mlx.core as mx

    return mx.concatenate([a.reshape(-1) for a in arrays])


def _split(vector, items):
    """(key, view of `vector` shaped as `a`) for each (key, a) of `items`, in the order _cat joined them."""
    at = 0
    for key, a in items:
        yield key, vector[at:at + a.size].reshape(a.shape)
        at += a.size


def flatten_optimizer_state(model, optimizer) -> None:
    """Turn optimizer.state's per-parameter entries into one vector per dtype and entry (Adam's m and v), under
    FLAT_KEY, in place (the compiled step holds this dict). A state restored from a checkpoint is taken as is."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    state = optimizer.state
    if FLAT_KEY in state:
        return
    optimizer.init(model.trainable_parameters())  # zeros where nothing was restored
    entries = dict(tree_flatten(state, is_leaf=lambda x: isinstance(x, dict) and
                                all(isinstance(v, mx.array) for v in x.values())))
    flat, groups = _flat_groups(model)
    state[FLAT_KEY] = {name: {k: _cat([entries[flat[i][0]][k] for i in idx]) for k in entries[flat[idx[0]][0]]}
                       for name, idx in groups.items()}
    for root in model.trainable_parameters():
        state.pop(root)


def per_parameter_state(model, optimizer) -> dict:
    """optimizer.state in mlx's per-parameter layout (what checkpoints keep, whatever the ranks), flat or not."""
    from mlx.utils import tree_unflatten

    state = optimizer.state
    if FLAT_KEY not in state:
        return state
    flat, groups = _flat_groups(model)
    entries = [(f"{key}.{k}", view) for name, idx in groups.items() for k, vector in state[FLAT_KEY][name].items()
               for key, view in _split(vector, [flat[i] for i in idx])]
    return {**{k: v for k, v in state.items() if k != FLAT_KEY}, **tree_unflatten(entries)}


def flat_update(model, optimizer, grad, accumulation: int = 1) -> None:
    """Average `grad` across ranks and apply `optimizer`, over all trainable weights of a dtype at once.

    The gradients and weights of each dtype are concatenated into one vector; one all-reduce and one optimizer
    update run on it, with the optimizer's state kept as such vectors (flatten_optimizer_state; checkpoints
    get mlx's per-parameter layout from per_parameter_state); the new weights are split back (views, no
    copies). For an elementwise optimizer each element goes through the same operations as in mlx's
    average_gradients + optimizer.update, so the results are identical (tests/test_step.py,
    tests/test_distributed.py). Why: on a GPU the per-parameter update is a few kernels per weight (Adam: the
    learning rate's cast, the bias corrections, the fused update), which the all-reduce makes wait for the
    whole backward pass; there the host launches them one by one while the GPU idles between them. On two
    H200s at 1B 8x1024 per GPU: 124.0 ms a step that way (1.93x one GPU), 116.8 ms flat (2.06x), 113.9 ms
    with no all-reduce at all; at 8B 4x2048, 1.96x and 2.01x (one call). Without an all-reduce the updates
    interleave with the backward pass, hidden (BENCHMARKS.md, "Session 9")."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    n = mx.distributed.init().size()
    grads = dict(tree_flatten(grad))
    flat, groups = _flat_groups(model)
    gs, ps = {}, {}
    for name, idx in groups.items():
        g = _cat([grads[flat[i][0]] for i in idx])
        if n > 1:
            g = mx.distributed.all_sum(g) / n  # on the backend's stream, as average_gradients
        if accumulation > 1:
            g = g / accumulation
        gs[name], ps[name] = g, _cat([flat[i][1] for i in idx])
    new = optimizer.apply_gradients({FLAT_KEY: gs}, {FLAT_KEY: ps})[FLAT_KEY]
    model.update(tree_unflatten([kv for name, idx in groups.items() for kv in _split(new[name], [flat[i] for i in idx])]))


def make_step(model, optimizer, accumulation: int, grad_checkpoint: bool = False, loss_chunk: int | None = None,
              loss_fn=None, bucket_mb: float = BUCKET_MB, comm_stream=None, checkpoint_part: str = "block",
              checkpoint_layers: int | None = None, flat: bool | None = None):
    """The compiled training step, as mlx-lm builds it: gradients accumulate over `accumulation` batches,
    are averaged across data-parallel ranks, then applied. `loss_fn(model, *batch) -> (loss, weight, aux)` is
    the objective's (default: next-token loss); aux is a dict of arrays (its metrics, and "tokens" trained).
    `grad_checkpoint`: recompute `checkpoint_part` of the first `checkpoint_layers` blocks (layers.checkpoint_blocks).
    `flat`: average and update over concatenated gradients (flat_update; None: use_flat_update decides).
    Returns (step, state): step(batch, grad, update) -> (loss, weight, aux, grad); evaluate `state` after each."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map

    if grad_checkpoint:
        from .layers import checkpoint_blocks

        checkpoint_blocks(model, str(checkpoint_part), checkpoint_layers)
    value_and_grad = nn.value_and_grad(model, loss_fn or with_tokens(partial(loss, chunk=loss_chunk)))
    if bucket_mb > 0 and comm_stream is None and mx.default_device() == mx.gpu:
        comm_stream = mx.new_stream(mx.gpu)  # the buckets' all-reduces beside the backward pass (BENCHMARKS.md)
    flat = use_flat_update(model, optimizer, bucket_mb) if flat is None else flat
    if flat:
        flatten_optimizer_state(model, optimizer)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, previous, update):
        (value, toks, aux), grad = value_and_grad(model, *batch)
        if previous is not None:
            grad = tree_map(lambda a, b: a + b, grad, previous)
        if update:
            if flat:
                flat_update(model, optimizer, grad, accumulation)
            else:
                grad = reduce_gradients(grad, bucket_mb, comm_stream)
                if accumulation > 1:
                    grad = tree_map(lambda g: g / accumulation, grad)
                optimizer.update(model, grad)
            grad = None
        return value, toks, aux, grad

    return step, state


CUDA_LAUNCHES = {"MLX_USE_CUDA_GRAPHS": "0", "MLX_MAX_OPS_PER_BUFFER": "5"}


def direct_cuda_launches() -> bool:
    """On CUDA, have MLX launch kernels directly, five to a batch of work, instead of building a CUDA graph
    for every twenty: building the graphs holds the host back more than launching saves (on an H200,
    +10-24% tokens/s at 1B 8x1024, +4-11% at 8B 4x2048; BENCHMARKS.md). Call before the first kernel
    runs; MLX reads these once. Values the user exported win. Returns whether kernels launch directly
    (see HostPace)."""
    import mlx.core as mx

    if not mx.cuda.is_available():
        return False
    for key, value in CUDA_LAUNCHES.items():
        os.environ.setdefault(key, value)
    return os.environ["MLX_USE_CUDA_GRAPHS"] == "0"


HEADROOM = 0.99


class HostPace:
    """Launching directly, the host runs far ahead of the GPU and allocates the buffers of work still queued:
    peak memory grew 64% at 1B. So a step runs strictly in order — under a memory limit of one byte MLX
    waits for queued work before evaluating more — until the first optimizer update and whenever a batch is
    bigger than any before it (length-bucketed batches vary); after each such step the limit becomes just
    under the peak so far, and the host runs ahead only while memory stays within it. Peak memory then stays
    at or below that of mlx-lm's graph-launched step (88.8 vs 90.0 GB at 8B, 26.2 vs 32.5 at 1B)."""

    def __init__(self, active: bool):
        import mlx.core as mx

        self.active, self.strict, self.updated, self.largest = active, False, False, 0
        self.previous = mx.get_memory_limit() if active else None

    def before(self, batch_size: int) -> None:
        """Before a step on a batch of `batch_size` array elements (rows x length)."""
        import mlx.core as mx

        if self.active and (batch_size > self.largest or not self.updated):
            self.strict, self.largest = True, max(self.largest, batch_size)
            mx.set_memory_limit(1)

    def stepped(self, update: bool) -> None:
        """After the step has been evaluated; `update`: it applied the optimizer."""
        import mlx.core as mx

        if self.strict:  # a hair under the peak: the host may pass the limit by one batch of kernels
            mx.set_memory_limit(max(1, int(mx.get_peak_memory() * HEADROOM)))
            self.strict, self.updated = False, self.updated or update

    def close(self) -> None:
        import mlx.core as mx

        if self.previous is not None:
            mx.set_memory_limit(self.previous)
            self.previous = None


# ------------------------------------------------------------------------------------------- optimizer


def optimizer_classes() -> dict:
    import mlx.optimizers as optim

    return {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD, "adafactor": optim.Adafactor,
            "muon": optim.Muon}


def optimizer_arguments(name: str) -> list[str]:
    """The keyword arguments mlx's optimizer `name` takes besides the learning rate."""
    import inspect

    params = inspect.signature(optimizer_classes()[name].__init__).parameters
    return [p for p in params if p not in ("self", "learning_rate")]


def check_optimizer_args(name: str, args: dict) -> dict:
    """`schedule.optimizer_args` for mlx's optimizer `name`, as keyword arguments: lists become tuples
    (betas, eps); an argument it does not take is a one-line error naming those it does."""
    from .errors import ConfigError

    takes = optimizer_arguments(name)
    if unknown := [k for k in args if k not in takes]:
        raise ConfigError(f"schedule.optimizer_args.{unknown[0]}: the {name} optimizer does not take it; it "
                          f"takes {', '.join(takes)}")
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in args.items()}


def build_optimizer(s, updates: int, warmup: int = 0):
    """mlx's optimizer `s.optimizer`, with `s.optimizer_args` and the learning-rate schedule (`warmup`:
    its warmup in optimizer updates, from the run's plan)."""
    from .errors import ConfigError

    lr = s.learning_rate
    if s.lr_schedule.name or s.lr_schedule.decay or warmup:
        lr = build_lr_schedule(s.learning_rate, s.lr_schedule, updates, warmup)
    name = str(s.optimizer)
    kwargs = check_optimizer_args(name, dict(s.optimizer_args))
    try:
        return optimizer_classes()[name](learning_rate=lr, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"schedule.optimizer_args={kwargs}: wrong for {name} ({e})") from None


def build_lr_schedule(peak: float, sc, updates: int, warmup: int):
    """mlx's schedulers, with lengths counted in optimizer updates and sensible default arguments: a linear
    warmup from warmup_init, then `decay` (cosine, linear or constant) to min_lr, or mlx's `name` (the
    settings checked by config.check_lr_schedule)."""
    import mlx.optimizers as optim

    from .errors import ConfigError

    end = sc.min_lr if sc.min_lr is not None else peak * (sc.min_lr_ratio or 0.0)
    decay = max(1, updates - warmup)
    name = {"cosine": "cosine_decay", "linear": "linear_schedule"}.get(str(sc.decay), sc.name) or "constant"
    fn = (lambda peak: lambda step: peak) if name == "constant" else getattr(optim.schedulers, name, None)
    names = [n for n in dir(optim.schedulers) if n.endswith(("_decay", "_schedule")) and n != "join_schedules"]
    if fn is None or not callable(fn):
        raise ConfigError(f"schedule.lr_schedule.name={name}: unknown: choose one of {', '.join(names)}")
    defaults = {"cosine_decay": [decay, end], "linear_schedule": [end, decay]}
    arguments = list(sc.arguments) if sc.name else defaults.get(name, [])
    try:
        schedule = fn(peak, *arguments)
    except TypeError as e:
        raise ConfigError(f"schedule.lr_schedule.arguments={arguments}: wrong for {name} ({e})") from None
    if warmup > 0:
        warm = optim.schedulers.linear_schedule(sc.warmup_init, peak, warmup)
        schedule = optim.schedulers.join_schedules([warm, schedule], [warmup])
    return schedule
