"""Objectives: what a batch holds and how its loss is computed. The loop (train.py) asks an objective for
tokenized splits, training and evaluation batches and the loss; checkpoints, resume and the data-parallel
code never look inside a batch, so a new objective plugs in here alone.

An objective provides:
    encode(splits, tokenizer) -> {split name: records}   tokenized, checked, over-long records handled (Batched)
    rows(records) -> int                                 training rows per epoch (the plan counts them)
    lengths(records) -> list[int]                        a length per record (the validation sample)
    train_batches(records, start) -> iterator            training batches from step `start` on, forever
    eval_batches(records, indices) -> iterator           evaluation batches over those records
    eval_count(n) -> int                                 how many evaluation batches n records make
    loss(model, *batch) -> (mean loss, weight, aux)      weight: what the mean is over (target tokens, pairs);
                                                         aux: metrics as batch means, and "tokens" trained
    eval_loss                                            the same, for validation
    prepare(model, run_dir, resumed)                     after the model is built, before training (optional)
"""

from __future__ import annotations

from ..errors import ConfigError


class Batched:
    """What objectives share: `self.batcher` (data.Batcher) over their records, and encoding every split with
    `self.encode_one(split, tokenizer) -> (records, note)`, the note (over-long records) printed once."""

    def encode(self, splits: dict, tokenizer) -> dict:
        out = {}
        for name, split in splits.items():
            out[name], note = self.encode_one(split, tokenizer)
            if note and self.rank == 0:
                print(f"tuning_fork: {note}")
        return out

    def train_batches(self, records, start: int = 0):
        return self.batcher.train(records, start)

    def eval_batches(self, records, indices=None):
        return self.batcher.fixed(records, indices)

    def eval_count(self, n: int) -> int:
        return self.batcher.count(n)


def build(cfg, rank: int = 0, size: int = 1):
    from .preference import Preference
    from .sft import NextToken

    objectives = {"sft": NextToken, "dpo": Preference, "orpo": Preference, "simpo": Preference}
    name = str(cfg.objective.name)
    if name not in objectives:
        raise ConfigError(f"objective={name}: unknown: choose one of {', '.join(objectives)}")
    return objectives[name](cfg, rank, size)
