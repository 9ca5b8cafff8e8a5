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
    """What objectives share: `self.batcher` (data.Batcher) over their records, and encoding every split: the
    objective's `tokenize(split, tokenizer, data, prompt, notes)` (data.encode_split, data.encode_pairs),
    then its `limit(records, split, data)` for data.too_long (data.limit_lengths, data.limit_pairs), the
    notes (reasoning, over-long records) printed once. Encoded splits go through the token cache (cache.py)
    unless data.cache=false; `self.cached` says, per split, whether it came from there. An objective's
    records are stored as columns of (ids, spans) rows: `to_columns(records)` and `from_columns(columns)`
    convert (one column by default)."""

    def encode(self, splits: dict, tokenizer) -> dict:
        from .. import cache
        from ..data import split_parts

        use = bool(self.cfg.data.get("cache", True))
        tokenizer_id = cache.tokenizer_digest(tokenizer) if use else None
        out, self.cached, self.sources = {}, {}, {}
        for name, split in splits.items():
            pieces, hits, offsets = [], [], []
            for part in split_parts(split, self.cfg.data, self.cfg.prompt):
                k = cache.key(part.split, tokenizer_id, self.cache_settings(part.data, part.prompt)) if use else None
                hit = cache.load(k) if use else None
                if hit is not None:
                    rows, notes = self.from_columns(hit[0]), hit[1]
                else:
                    rows, notes = self.encode_one(part.split, tokenizer, part.data, part.prompt)
                    if use and self.rank == 0:
                        cache.store(k, self.to_columns(rows), notes)
                hits.append(hit is not None)
                at = sum(map(len, pieces))
                offsets.append((part.name, at, at + len(rows)))
                pieces.append(rows)
                for note in notes if self.rank == 0 else ():
                    print(f"tuning_fork: {part.name + ': ' if part.name else ''}{note}")
            records = pieces[0] if len(pieces) == 1 else [r for rows in pieces for r in rows]
            out[name], self.cached[name] = records, all(hits)
            if split.parts:
                self.sources[name] = offsets
        mixed(self, splits)
        return out

    def encode_one(self, split, tokenizer, data, prompt) -> tuple[list, list]:
        notes: list = []
        records = self.tokenize(split, tokenizer, data, prompt, notes)
        records, note = self.limit(records, split, data)
        return records, notes + [note] if note else notes

    def cache_settings(self, data, prompt) -> dict:
        """What besides the split and the tokenizer decides the tokens: the objective, every data setting but
        where the data lives (its contents are keyed instead), the prompt format and system prompt."""
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(data, resolve=True, enum_to_str=True)
        for where in ("path", "source", "cache", "hf_config", "train_split", "valid_split", "test_split", "sources",
                      "records_per_epoch"):
            data.pop(where, None)
        return {"objective": str(self.cfg.objective.name), "data": data,
                "prompt": {"format": str(prompt.format), "system": prompt.get("system")}}

    def rows(self, records) -> int:
        """Training rows per epoch (the plan counts them): records (a mixture's epoch), or packed rows."""
        return self.batcher.rows_per_epoch(records)

    @staticmethod
    def to_columns(records) -> list:
        return [records]

    @staticmethod
    def from_columns(columns) -> list:
        return columns[0]

    def train_batches(self, records, start: int = 0):
        return self.batcher.train(records, start)

    def eval_batches(self, records, indices=None):
        return self.batcher.fixed(records, indices)

    def eval_count(self, n: int) -> int:
        return self.batcher.count(n)


def mixed(objective, splits: dict) -> None:
    """A mixture's training epochs: each draws its records from the sources (objective.sources["train"]: each
    source's (name, start, end) in the concatenated records)."""
    from ..mixture import Sampler

    if "train" in objective.sources:
        parts, d = splits["train"].parts, objective.cfg.data
        objective.batcher.sample = Sampler(objective.sources["train"], [p.weight for p in parts],
                                           [p.epochs for p in parts], d.records_per_epoch, objective.cfg.seed)


def build(cfg, rank: int = 0, size: int = 1):
    from .grpo import GRPO
    from .preference import Preference
    from .sft import NextToken

    objectives = {"sft": NextToken, "dpo": Preference, "orpo": Preference, "simpo": Preference, "grpo": GRPO}
    name = str(cfg.objective.name)
    if name not in objectives:
        raise ConfigError(f"objective={name}: unknown: choose one of {', '.join(objectives)}")
    return objectives[name](cfg, rank, size)
