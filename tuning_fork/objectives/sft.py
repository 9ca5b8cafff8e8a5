"""`objective=sft`: next-token prediction on the target tokens of each record (all of them, or those after
the prompt with data.mask_prompt), length-bucketed or packed batches (tuning_fork/data.py)."""

from __future__ import annotations

from functools import partial

from .. import data
from . import Batched


class NextToken(Batched):
    name = "sft"
    tokenize = staticmethod(data.encode_split)
    limit = staticmethod(data.limit_lengths)

    def __init__(self, cfg, rank: int = 0, size: int = 1):
        from ..step import loss, with_tokens

        self.cfg, self.rank = cfg, rank
        self.batcher = data.Batcher(cfg.schedule.batch_size, cfg.data.max_seq_length, cfg.seed,
                                    cfg.data.packing, rank, size)
        self.loss = with_tokens(partial(loss, chunk=cfg.schedule.loss_chunk))
        self.eval_loss = with_tokens(loss)  # evaluation keeps no graph: nothing to gain from chunking

    @staticmethod
    def lengths(records) -> list[int]:
        return [len(ids) for ids, _ in records]

