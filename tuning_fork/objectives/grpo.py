"""`objective=grpo`: reinforcement learning from rewards you write (Group Relative Policy Optimization,
Shao et al. 2024, DeepSeekMath; as DeepSeek-R1 uses it), with the loss variants TRL's GRPOTrainer documents.

Each step takes a batch of prompts and, for each, samples G = objective.group_size completions from the current
policy (mlx-lm's batched generation with a KV cache; temperature, top_p, max_tokens), scores them with the
rewards (tuning_fork/rewards.py: a weighted sum), and turns rewards into advantages within each group:

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)        loss_type grpo, dapo   (std with Bessel's correction, as TRL)
    A_i =  r_i - mean(r)                           loss_type dr_grpo      (Liu et al. 2025: no std scaling)

The loss per completion token t of completion i, with ρ = π_θ / π_old (π_old: the policy that sampled the
batch; ρ = 1 in value when each batch trains once) and the k3 estimate of the KL to the reference policy
(Schulman 2020), D = exp(log π_ref - log π_θ) - (log π_ref - log π_θ) - 1:

    l_{i,t} = -min(ρ A_i, clip(ρ, 1 - ε, 1 + ε_high) A_i) + β D_{i,t}

    grpo:     mean over completions of (sum over its tokens / its length)
    dapo:     sum over every token / the number of tokens (Yu et al. 2025: token-level)
    dr_grpo:  sum over every token / (completions × max_tokens)

objective.iterations_per_batch (μ) trains each batch of completions μ times (ρ then moves away from 1 and
the clipping acts). The reference is the starting policy: its trainable weights (the fresh adapters, or the
previous stage's) are kept and swapped in to score each batch, so no second model sits in memory; β = 0
skips it.

Sampling is seeded by the seed, the batch and the rank, and the weights are restored exactly, so a resumed run
samples what the uninterrupted one did; with μ > 1 the batch being reused is kept in RUN/grpo/ so a run
stopped within its μ iterations resumes with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import data, rewards
from ..errors import ConfigError, DataError
from ..tracking import Hook, WandbLog


@dataclass
class Prompt:
    ids: np.ndarray  # the prompt's tokens, with the generation prompt
    prompt: object  # what a reward sees: the prompt string, or the chat messages
    fields: dict = field(default_factory=dict)  # the record's other columns
    chat: bool = False


def prompt_of(rec: dict, fmt: str, d, prompt_cfg) -> tuple[object, list, dict, bool]:
    """(what rewards see as the prompt, the messages to render, the other fields, chat?) of one record: a
    {"prompt"} record (a user turn after prompt.system), or a chat up to its last assistant turn (whose text
    becomes the field `answer` unless the record has one)."""
    if fmt in ("prompts", "completions"):
        text = rec[d.prompt_feature]
        messages = [{"role": "user", "content": text}]
        if prompt_cfg.system:
            messages.insert(0, {"role": "system", "content": prompt_cfg.system})
        fields = {k: v for k, v in rec.items() if k != d.prompt_feature}
        if fmt == "completions":
            fields.setdefault("answer", rec[d.completion_feature])
        return text, messages, fields, False
    messages = list(rec[d.chat_feature])
    fields = {k: v for k, v in rec.items() if k not in (d.chat_feature, "tools")}
    if messages[-1].get("role") == "assistant":
        fields.setdefault("answer", messages[-1].get("content"))
        messages = messages[:-1]
    return messages, messages, fields, True


class GRPO:
    name = "grpo"
    monitor = "val_reward_mean"  # the best adapter and early stopping follow the reward, unless told otherwise

    def __init__(self, cfg, rank: int = 0, size: int = 1):
        o = cfg.objective
        if str(o.loss_type) not in ("grpo", "dr_grpo", "dapo"):
            raise ConfigError(f"objective.loss_type={o.loss_type}: objective=grpo takes grpo, dr_grpo or dapo")
        if o.group_size < 2:
            raise ConfigError(f"objective.group_size={o.group_size}: a group needs at least 2 completions to compare")
        if cfg.data.packing:
            raise ConfigError("data.packing=true with objective=grpo: completions are not packed; use data.packing=false")
        if o.iterations_per_batch < 1:
            raise ConfigError(f"objective.iterations_per_batch={o.iterations_per_batch}: use at least 1")
        self.cfg, self.o, self.rank, self.size = cfg, o, rank, size
        self.rewards = rewards.build(o.rewards)
        self.mu = int(o.iterations_per_batch)
        # log-probabilities CHUNK positions at a time (step.token_logps): G completions a prompt make the
        # (positions x vocabulary) logits the largest thing a step holds (12.6 GB in float32 at 1B, 64 x 384)
        self.chunk = cfg.schedule.loss_chunk or 1024
        self.batcher = data.Batcher(cfg.schedule.batch_size, cfg.data.max_seq_length, cfg.seed, False, rank, size,
                                    length=lambda p: len(p.ids), collate_rows=lambda rows, _: (rows,))
        self.model = self.reference = self.tokenizer = self.run_dir = None
        self.cached, self.sources, self.samples = {}, {}, []
        self.loss = self.policy_loss
        self.eval_loss = self.validate

    # ------------------------------------------------------------------------------------------ the data

    def encode(self, splits: dict, tokenizer) -> dict:
        from ..chat import Conversations

        from . import mixed

        self.tokenizer = tokenizer
        out = {}
        for name, split in splits.items():
            prompts = []
            for part in data.split_parts(split, self.cfg.data, self.cfg.prompt):
                start = len(prompts)
                if part.split.format in ("text", "preference"):
                    raise DataError(f"{part.split.origin}: {part.split.format} records, but objective=grpo needs prompts: "
                                    f'{{"{part.data.prompt_feature}": ..., <fields for the rewards>}} or '
                                    f'{{"{part.data.chat_feature}": [...]}} (a chat up to the turn to answer)')
                chats = Conversations(tokenizer, part.prompt.format, part.data)
                for rec in part.split.records:
                    shown, messages, fields, chat = prompt_of(rec, part.split.format, part.data, part.prompt)
                    ids = np.array(chats.prompt_ids(messages, rec.get("tools")), np.int32)
                    prompts.append(Prompt(ids, shown, fields, chat))
                if split.parts:
                    self.sources.setdefault(name, []).append((part.name, start, len(prompts)))
            room = self.cfg.data.max_seq_length - self.o.max_tokens
            long = sum(len(p.ids) > room for p in prompts)
            if long:
                raise DataError(f"{split.origin}: {long} of {len(prompts)} {name} prompts leave no room for "
                                f"objective.max_tokens={self.o.max_tokens} within data.max_seq_length="
                                f"{self.cfg.data.max_seq_length}: raise data.max_seq_length or shorten them")
            out[name], self.cached[name] = prompts, False
        mixed(self, splits)
        return out

    def rows(self, records) -> int:
        """Iterations per epoch × batch size: each batch of prompts trains μ times."""
        return len(self.batcher.indices(len(records), 0)) * self.mu

    @staticmethod
    def lengths(records) -> list[int]:
        return [len(p.ids) for p in records]

    def eval_count(self, n: int) -> int:
        return self.batcher.count(n)

    # ------------------------------------------------------------------------------- before the first step

    def prepare(self, model, sets: dict, run_dir: Path, resumed: bool) -> None:
        """The reference: the starting policy's trainable weights (before a resume restores the trained ones)."""
        import mlx.core as mx
        from mlx.utils import tree_map

        self.model, self.run_dir = model, run_dir
        if self.o.beta > 0:
            self.reference = tree_map(lambda w: mx.array(w), model.trainable_parameters())
            mx.eval(self.reference)

    def hooks(self, run) -> list:
        return [Samples()]

    # ---------------------------------------------------------------------------------------- sampling

    def train_batches(self, records, start: int = 0):
        """Each batch of prompts rolled out, then trained μ times; from iteration `start` on."""
        group, within = divmod(start, self.mu)
        prompts = self.batcher.train(records, group + (1 if within else 0))  # (a batch being reused was drawn)
        if within:
            batch = self.load_group(group)
            for _ in range(within, self.mu):
                yield batch
            group += 1
        while True:
            (chunk,) = next(prompts)
            batch = self.rollout(chunk, np.random.SeedSequence([self.cfg.seed, group, self.rank, 0x6770]))
            if self.mu > 1:
                self.save_group(group, batch)
            for _ in range(self.mu):
                yield batch
            group += 1

    def generate(self, prompt_ids: list, seed) -> tuple[list, float]:
        """Completions (token lists, each ending with its stop token when it stopped) and the seconds it took."""
        import mlx.core as mx
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.sample_utils import make_sampler

        mx.random.seed(int(seed.generate_state(1)[0]))
        tic = time.perf_counter()
        gen = BatchGenerator(self.model, max_tokens=self.o.max_tokens,
                             stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
                             sampler=make_sampler(self.o.temperature, top_p=self.o.top_p),
                             completion_batch_size=len(prompt_ids), prefill_batch_size=min(len(prompt_ids), 64))
        uids = gen.insert([list(map(int, p)) for p in prompt_ids])
        out = {uid: [] for uid in uids}
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(int(r.token))
        gen.close()
        return [out[uid] for uid in uids], time.perf_counter() - tic

    def rollout(self, prompts: list[Prompt], seed, keep: int = 0):
        """The batch arrays for these prompts: G completions each, their rewards and advantages, the old and
        reference log-probabilities the loss needs. `keep`: how many (prompt, completion, reward) samples to keep."""
        import mlx.core as mx

        G = self.o.group_size
        was_training = self.model.training
        self.model.eval()
        completions, seconds = self.generate([p.ids for p in prompts for _ in range(G)], seed)
        eos = set(self.tokenizer.eos_token_ids)
        texts = [self.tokenizer.decode([t for t in c if t not in eos]) for c in completions]
        owners = [p for p in prompts for _ in range(G)]
        shown = [[{"role": "assistant", "content": t}] if p.chat else t for p, t in zip(owners, texts)]
        fields = {k: [p.fields.get(k) for p in owners] for k in {k for p in prompts for k in p.fields}}
        total, per = rewards.score(self.rewards, [p.prompt for p in owners], shown, fields)
        r = np.array(total, np.float64).reshape(len(prompts), G)
        advantages = self.advantages(r).reshape(-1)
        rows = [(np.concatenate([p.ids, np.array(c, np.int32)]), ((len(p.ids), len(p.ids) + len(c)),))
                for p, c in zip(owners, completions)]
        tokens, mask = data.collate(rows, self.cfg.data.max_seq_length)
        old = self.token_logps(tokens) if self.mu > 1 else mx.zeros(mask.shape, mx.float32)
        ref = self.reference_logps(tokens) if self.reference is not None else mx.zeros(mask.shape, mx.float32)
        if was_training:
            self.model.train()
        if keep:
            self.samples += [{"prompt": p.prompt if not p.chat else p.prompt[-1].get("content"), "completion": t,
                              "reward": s, **{f"reward/{k}": v[i] for k, v in per.items()}}
                             for i, (p, t, s) in enumerate(zip(owners, texts, total))][:keep - len(self.samples)]
        names = [rw.name for rw in self.rewards]
        per_reward = np.array([[np.nan if v is None else v for v in per[n]] for n in names], np.float32)
        return (tokens, mask, mx.array(advantages, mx.float32), old, ref, mx.array(np.array(total, np.float32)),
                mx.array(per_reward), mx.array(np.array([len(c) for c in completions], np.float32)),
                mx.array(np.float32(seconds)))

    def advantages(self, rewards: np.ndarray) -> np.ndarray:
        """`advantage` under this run's loss_type and scale_rewards."""
        scale = self.o.scale_rewards
        return advantage(rewards, str(self.o.loss_type), scale and str(scale))

    def token_logps(self, tokens):
        """log π(token) at every position, under the model as it is, with no gradient."""
        import mlx.core as mx

        from ..step import token_logps

        logps = mx.stop_gradient(token_logps(self.model, tokens, self.chunk))
        mx.eval(logps)
        return logps

    def reference_logps(self, tokens):
        """The same under the starting policy: its weights swapped in, then the current ones back."""
        import mlx.core as mx
        from mlx.utils import tree_map

        current = tree_map(lambda w: w, self.model.trainable_parameters())
        self.model.update(self.reference)
        try:
            return self.token_logps(tokens)
        finally:
            self.model.update(current)
            mx.eval(self.model.parameters())

    # ---------------------------------------------------------------------------------------- the loss

    def policy_loss(self, model, tokens, mask, advantages, old, ref, total, per_reward, lengths, seconds):
        """(the loss of loss_type, the completions it is over, its metrics); see the module's docstring."""
        import mlx.core as mx

        from ..step import token_logps

        o = self.o
        logp = token_logps(model, tokens, self.chunk)
        m = mask.astype(mx.float32)
        before = old if self.mu > 1 else mx.stop_gradient(logp)
        ratio = mx.exp(logp - before)
        a = advantages[:, None]
        high = o.epsilon if o.epsilon_high is None else o.epsilon_high
        clipped = mx.clip(ratio, 1 - o.epsilon, 1 + high) * a
        per_token = -mx.minimum(ratio * a, clipped)
        kl = mx.zeros_like(logp)
        if o.beta > 0:
            d = ref - logp
            kl = mx.exp(d) - d - 1
            per_token = per_token + o.beta * kl
        n = m.sum(-1)
        rows = tokens.shape[0]
        if o.loss_type == "grpo":
            value = ((per_token * m).sum(-1) / mx.maximum(n, 1)).mean()
        elif o.loss_type == "dapo":
            value = (per_token * m).sum() / mx.maximum(m.sum(), 1)
        else:  # dr_grpo
            value = (per_token * m).sum() / (rows * o.max_tokens)
        tokens_n = mx.maximum(m.sum(), 1)
        aux = {"tokens": m.sum(), "reward_mean": nanmean(total), "reward_std": nanstd(total),
               "kl": mx.stop_gradient((kl * m).sum() / tokens_n),
               "clip_ratio": mx.stop_gradient(((clipped < ratio * a) * m).sum() / tokens_n),
               "completion_length": lengths.mean(), "generation_seconds": seconds,
               "completions_per_second": rows / mx.maximum(seconds, 1e-9)}
        for i, rw in enumerate(self.rewards):
            aux[f"reward/{rw.name}"] = nanmean(per_reward[i])
        return value, mx.array(rows, mx.float32), aux

    # -------------------------------------------------------------------------------------- validation

    def eval_batches(self, records, indices=None):
        return self.batcher.fixed(records, indices)

    def validate(self, model, prompts):
        """Validation: G completions for each validation prompt, sampled with a seed of their own (the same at
        every validation), scored like a training batch; a few are kept for a look (RUN/samples/)."""
        first = prompts[0].ids  # the same prompts get the same draws at every validation
        seed = np.random.SeedSequence([self.cfg.seed, 0x7A1, self.rank, len(prompts), len(first), int(first.sum())])
        batch = self.rollout(prompts, seed, keep=self.o.log_samples)
        return self.policy_loss(model, *batch)

    # ------------------------------------------------------------------------- a batch reused μ times

    def group_file(self) -> Path:
        return self.run_dir / "grpo" / f"batch-rank{self.rank}.npz"

    def save_group(self, group: int, batch) -> None:
        import os

        path = self.group_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}")
        with open(tmp, "wb") as fh:
            np.savez(fh, group=group, **{f"a{i}": np.array(a) for i, a in enumerate(batch)})
        os.replace(tmp, path)

    def load_group(self, group: int):
        import mlx.core as mx

        path = self.group_file()
        saved = np.load(path) if path.exists() else None
        if saved is None or int(saved["group"]) != group:
            raise DataError(f"resume=true: {path} does not hold batch {group}, which the run was reusing "
                            f"(objective.iterations_per_batch={self.mu}): it cannot be sampled again from "
                            "trained weights; start the run again")
        return tuple(mx.array(saved[f"a{i}"]) for i in range(len(saved.files) - 1))


def advantage(rewards: np.ndarray, loss_type: str, scale: str | None = None) -> np.ndarray:
    """Group-relative advantages of rewards shaped (prompts, group); NaN rewards (no reward applied) count 0.
    Each reward less its group's mean, over `scale`'s std (TRL's scale_rewards; Bessel-corrected, as torch.std):
    "group" (DeepSeekMath's GRPO), "batch" (all of this rank's rewards), "none"; None: none for dr_grpo, else group."""
    r = np.nan_to_num(rewards, nan=0.0)
    centred = r - r.mean(axis=1, keepdims=True)
    scale = scale or ("none" if loss_type == "dr_grpo" else "group")
    if scale == "none":
        return centred
    std = r.std(axis=1, ddof=1, keepdims=True) if scale == "group" else r.std(ddof=1)
    return centred / (std + 1e-4)


def nanmean(x):
    import mlx.core as mx

    ok = ~mx.isnan(x)
    return mx.where(ok, x, 0).sum() / mx.maximum(ok.sum(), 1)


def nanstd(x):
    import mlx.core as mx

    ok = ~mx.isnan(x)
    mean = nanmean(x)
    return mx.sqrt(mx.where(ok, (x - mean) ** 2, 0).sum() / mx.maximum(ok.sum(), 1))


class Samples(Hook):
    """After each validation, the kept completions go to RUN/samples/iteration-NNNNNNN.jsonl (and a W&B table)."""

    def on_validation(self, run, info: dict) -> None:
        import json

        samples, run.objective.samples = run.objective.samples, []
        if run.rank or not samples:
            return
        folder = run.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"iteration-{info['iteration']:07d}.jsonl"
        path.write_text("".join(json.dumps(s, default=float) + "\n" for s in samples))
        for hook in run.hooks:
            if isinstance(hook, WandbLog):
                import wandb

                keys = list(samples[0])
                hook.run.log({"samples": wandb.Table(columns=keys, data=[[s.get(k) for k in keys] for s in samples])},
                             step=info["iteration"])
