"""`objective=dpo|orpo|simpo`: preference tuning on pairs of answers (chosen, rejected) to one prompt.

The losses are the papers', as TRL documents them (DPOTrainer, CPOTrainer, ORPOTrainer); log π(y) is the
sum of the answer's token log-probabilities, \\bar{log π}(y) their mean, σ the logistic function:
- dpo, loss_type=sigmoid (Rafailov et al. 2023), with label smoothing ε (conservative DPO):
      z = (log π(c) - log π(r)) - (log π_ref(c) - log π_ref(r));  loss = -(1-ε) log σ(βz) - ε log σ(-βz)
  loss_type=ipo (Azar et al. 2023): (z - 1/(2β))²;  loss_type=hinge (SLiC, Zhao et al. 2023): max(0, 1 - βz).
  Rewards: β(log π(c) - log π_ref(c)) and β(log π(r) - log π_ref(r)).
- orpo (Hong et al. 2024): loss = NLL(c) - β log σ(log odds(c) - log odds(r)), odds(y) = p/(1-p) with
  p = exp(\\bar{log π}(y)); NLL(c) is the mean cross-entropy of the chosen answers. Rewards: β \\bar{log π}(y).
- simpo (Meng et al. 2024): z = \\bar{log π}(c) - \\bar{log π}(r) - γ/β (gamma_beta_ratio = γ/β);
  loss = -(1-ε) log σ(βz) - ε log σ(-βz). Rewards: β \\bar{log π}(y).

The reference policy of dpo is the starting policy (the base with fresh adapters, or the previous stage's
result): its log-probabilities are computed once, before the first step, with no second model in memory,
and stored in RUN/reference/logps.npz, which a resumed run reads instead of computing them again.
A batch holds n pairs as 2n rows (chosen first, then rejected): both answers of a pair in one forward pass.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np

from .. import data
from ..errors import ConfigError, DataError
from . import Batched

REFERENCE = Path("reference") / "logps.npz"


def sequence_logps(model, tokens, mask, chunk: int | None = None):
    """Per row: the sum of the target tokens' log-probabilities, and how many targets there are.

    `chunk` (schedule.loss_chunk): the logits `chunk` positions at a time, recomputed in the backward pass,
    so the (rows, length, vocabulary) logits never exist at once (as step.chunked_cross_entropy does for sft)."""
    import mlx.core as mx
    import mlx.nn as nn

    from ..step import output_head

    inputs, targets, m = tokens[:, :-1], tokens[:, 1:], mask.astype(mx.float32)
    head = output_head(model) if chunk else None
    if head is None:
        logp = -nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets)
        return (logp * m).sum(-1), m.sum(-1)
    project = head.as_linear if isinstance(head, nn.Embedding) else head

    def piece(t, w):  # targets and weights are constants of the checkpointed function
        return nn.utils.checkpoint(head, lambda h: -(nn.losses.cross_entropy(project(h).astype(mx.float32), t) * w)
                                   .sum(-1))

    hidden = model.model(inputs)
    sums = mx.zeros((tokens.shape[0],), mx.float32)
    for i in range(0, hidden.shape[1], chunk):
        sums = sums + piece(targets[:, i:i + chunk], m[:, i:i + chunk])(hidden[:, i:i + chunk])
    return sums, m.sum(-1)


def preference_loss(o, chosen, rejected, chosen_n, rejected_n, ref_chosen, ref_rejected):
    """(per-pair losses, chosen rewards, rejected rewards, the log-probabilities the loss used) for the
    objective config `o`; see the module's docstring."""
    import mlx.core as mx
    import mlx.nn as nn

    beta = o.beta
    if o.name == "dpo":
        z = (chosen - rejected) - (ref_chosen - ref_rejected)
        if o.loss_type == "ipo":
            losses = (z - 1 / (2 * beta)) ** 2
        elif o.loss_type == "hinge":
            losses = nn.relu(1 - beta * z)
        else:
            losses = -(1 - o.label_smoothing) * nn.log_sigmoid(beta * z) - o.label_smoothing * nn.log_sigmoid(-beta * z)
        return losses, beta * (chosen - ref_chosen), beta * (rejected - ref_rejected), (chosen, rejected)
    c, r = chosen / mx.maximum(chosen_n, 1), rejected / mx.maximum(rejected_n, 1)  # mean log-probabilities
    if o.name == "simpo":
        z = c - r - o.gamma_beta_ratio
        losses = -(1 - o.label_smoothing) * nn.log_sigmoid(beta * z) - o.label_smoothing * nn.log_sigmoid(-beta * z)
    else:  # orpo: the odds ratio term (the NLL term is added by the caller, over the batch's tokens)
        log1m = lambda x: mx.log1p(-mx.minimum(mx.exp(x), 1 - 1e-7))
        losses = -beta * nn.log_sigmoid((c - r) - (log1m(c) - log1m(r)))
    return losses, beta * c, beta * r, (c, r)


class Preference(Batched):
    """Pairs of answers: encoding, length-bucketed pair batches, the loss of `objective.name`, metrics."""

    tokenize = staticmethod(data.encode_pairs)
    limit = staticmethod(data.limit_pairs)

    def __init__(self, cfg, rank: int = 0, size: int = 1):
        if cfg.data.packing:
            raise ConfigError(f"data.packing=true with objective={cfg.objective.name}: pairs are not packed; "
                              "use data.packing=false")
        if cfg.objective.name == "dpo" and str(cfg.objective.loss_type) not in ("sigmoid", "ipo", "hinge"):
            raise ConfigError(f"objective.loss_type={cfg.objective.loss_type}: objective=dpo takes sigmoid, ipo or hinge")
        self.cfg, self.o, self.rank = cfg, cfg.objective, rank
        self.batcher = data.Batcher(cfg.schedule.batch_size, cfg.data.max_seq_length, cfg.seed, False, rank, size,
                                    length=self.length, collate_rows=data.collate_pairs)
        self.chunk = cfg.schedule.get("loss_chunk")
        self.loss, self.eval_loss = partial(self.pair_loss, chunk=self.chunk), self.pair_loss
        self.needs_reference = self.o.name == "dpo"

    @staticmethod
    def length(pair) -> int:
        return max(len(pair[0]), len(pair[2]))

    @staticmethod
    def to_columns(records) -> list:
        return [[(p[0], p[1]) for p in records], [(p[2], p[3]) for p in records]]

    @staticmethod
    def from_columns(columns) -> list:
        return [[c, sc, r, sr, 0.0, 0.0] for (c, sc), (r, sr) in zip(*columns)]

    def lengths(self, records) -> list[int]:
        return [self.length(p) for p in records]

    def pair_loss(self, model, tokens, mask, ref_chosen, ref_rejected, chunk: int | None = None):
        import mlx.core as mx

        sums, counts = sequence_logps(model, tokens, mask, chunk)
        n = ref_chosen.shape[0]
        losses, chosen_reward, rejected_reward, (c, r) = preference_loss(
            self.o, sums[:n], sums[n:], counts[:n], counts[n:], ref_chosen, ref_rejected)
        value = losses.mean()
        if self.o.name == "orpo":
            value = value - sums[:n].sum() / mx.maximum(counts[:n].sum(), 1)  # + NLL of the chosen answers
        aux = {"tokens": counts.sum(), "reward_accuracy": (chosen_reward > rejected_reward).astype(mx.float32).mean(),
               "reward_margin": (chosen_reward - rejected_reward).mean(), "chosen_reward": chosen_reward.mean(),
               "rejected_reward": rejected_reward.mean(), "chosen_logp": c.mean(), "rejected_logp": r.mean()}
        return value, mx.array(n, mx.float32), aux

    # ------------------------------------------------------------------------------------- the reference

    def prepare(self, model, sets: dict, run_dir: Path, resumed: bool) -> None:
        """The reference log-probabilities of every pair, from the model as it starts (dpo only)."""
        if not self.needs_reference:
            return
        path = run_dir / REFERENCE
        if path.exists():
            saved = np.load(path)
            for name, records in sets.items():
                if saved[f"{name}_chosen"].shape[0] != len(records):
                    raise DataError(f"{path}: its reference log-probabilities are for another data set "
                                    f"({saved[f'{name}_chosen'].shape[0]} {name} pairs, the data has {len(records)})")
                for pair, c, r in zip(records, saved[f"{name}_chosen"], saved[f"{name}_rejected"]):
                    pair[4], pair[5] = float(c), float(r)
            return
        if resumed:
            raise DataError(f"resume=true: {path} is missing: the reference log-probabilities of the run's start "
                            "cannot be recomputed from a trained model; start the run again")
        arrays = {}
        for name, records in sets.items():
            arrays[f"{name}_chosen"], arrays[f"{name}_rejected"] = self.reference_logps(model, records)
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(".logps.tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)

    def reference_logps(self, model, records) -> tuple[np.ndarray, np.ndarray]:
        import mlx.core as mx

        chosen, rejected = np.zeros(len(records), np.float32), np.zeros(len(records), np.float32)
        order = sorted(range(len(records)), key=lambda i: self.length(records[i]))
        model.eval()
        for k in range(0, len(order), self.cfg.schedule.batch_size):
            idx = order[k:k + self.cfg.schedule.batch_size]
            tokens, mask, _, _ = data.collate_pairs([records[i] for i in idx], self.cfg.data.max_seq_length)
            sums, _ = sequence_logps(model, tokens, mask)
            sums = np.array(mx.stop_gradient(sums))
            chosen[idx], rejected[idx] = sums[:len(idx)], sums[len(idx):]
        model.train()
        for pair, c, r in zip(records, chosen, rejected):
            pair[4], pair[5] = float(c), float(r)
        return chosen, rejected
