"""Mixtures (`data=mix`): several named sources, each with its own fields and prompt format, mixed into every
epoch in chosen proportions.

    data.sources.NAME: {source: jsonl|hf|demo, path, weight | epochs, field names, mask_prompt, prompt_format, ...}

An epoch holds `data.records_per_epoch` records (default: what the sources' epochs and sizes make). A source
with `epochs: e` gives e × its size of them; the sources with a `weight` share the rest in proportion to
their weights (largest remainders, so the counts add up exactly); a source with neither has `epochs: 1`.

Each source's records are drawn from an endless stream of its own: shuffled passes over it, one after another,
each in a fresh order. Epoch k takes the next `count` records of that stream, so a source larger than its share
shows every record before any repeats, and a smaller one is repeated (whole passes, then part of one). The
stream is a function of the seed, the source's name and the pass, so any epoch is drawn alike after a resume.

Validation keeps the sources apart: `val_loss/NAME` for each source with a validation split, beside the
overall `val_loss` over all of them.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

SETTINGS = ("source", "path", "hf_config", "train_split", "valid_split", "test_split", "text_feature",
            "prompt_feature", "completion_feature", "chat_feature", "chosen_feature", "rejected_feature",
            "system_feature", "mask_prompt", "train_on", "reasoning")


@dataclass
class Part:
    """One source's share of a split: its records (a data.Split) and the settings that encode them."""

    name: str
    split: object  # data.Split
    data: object  # the data settings for this source (the data group's, with the source's own)
    prompt: object  # the prompt settings (prompt.format and system, or the source's)
    weight: float | None
    epochs: float | None


def sources(data) -> dict:
    """data.sources, each checked against config.SourceConfig: {name: typed settings}."""
    from dataclasses import fields

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import SourceConfig

    out = {}
    for name, src in (data.sources or {}).items():
        if not isinstance(src, dict) and not OmegaConf.is_dict(src):
            raise ConfigError(f"data.sources.{name}={src!r}: a source is a mapping, e.g. "
                              f"data.sources.{name}.path=<folder> data.sources.{name}.weight=1")
        unknown = sorted(set(src) - {f.name for f in fields(SourceConfig)})
        if unknown:
            raise ConfigError(f"data.sources.{name}.{unknown[0]}: no such setting: a source takes "
                              f"{', '.join(f.name for f in fields(SourceConfig))}")
        try:
            out[name] = OmegaConf.merge(OmegaConf.structured(SourceConfig), src)
        except OmegaConfBaseException as e:
            raise ConfigError(f"data.sources.{name}.{e.key or ''}: {str(e).splitlines()[0]}") from None
    return out


def check(data) -> None:
    """The mixture's settings, before anything is read: one line per mistake, naming the key."""
    if not data.sources:
        raise ConfigError("data=mix needs sources: data.sources.NAME.path=<folder> for each (and .weight=... or "
                          ".epochs=...), e.g. in an experiment file")
    for name, src in sources(data).items():
        key = f"data.sources.{name}"
        if src.source in ("jsonl", "hf") and not src.path:
            raise ConfigError(f"{key}.path is missing: point it at " +
                              ("a folder holding train.jsonl" if src.source == "jsonl" else "a data set id"))
        if src.weight is not None and src.epochs is not None:
            raise ConfigError(f"{key}: weight and epochs both set: choose one (a share of each epoch, or whole "
                              "passes over the source)")
        if src.weight is not None and not src.weight > 0:
            raise ConfigError(f"{key}.weight={src.weight!r} is invalid: use a positive weight")
        if src.epochs is not None and not src.epochs > 0:
            raise ConfigError(f"{key}.epochs={src.epochs!r} is invalid: use a positive number of passes")
    if data.records_per_epoch is not None and data.records_per_epoch < 1:
        raise ConfigError(f"data.records_per_epoch={data.records_per_epoch!r} is invalid: use at least 1, or null")


def source_settings(data, prompt, name: str):
    """(data settings, prompt settings) for source `name`: the groups' values with the source's own."""
    from omegaconf import OmegaConf

    src = sources(data)[name]
    base = OmegaConf.to_container(data, resolve=True, enum_to_str=True)
    base.pop("sources"), base.pop("records_per_epoch")
    own = OmegaConf.to_container(src, resolve=True, enum_to_str=True)
    base.update({k: own[k] for k in SETTINGS if own[k] is not None or k in ("path", "hf_config", "valid_split", "test_split")})
    p = OmegaConf.to_container(prompt, resolve=True, enum_to_str=True) if prompt is not None else {}
    if own["prompt_format"] is not None:
        p["format"] = own["prompt_format"]
    if own["system"] is not None:
        p["system"] = own["system"]
    return OmegaConf.create(base), OmegaConf.create(p)


def load_parts(data, prompt) -> dict[str, list[Part]]:
    """Every source's splits, read and checked: {split name: [Part, ...]} (a source without a validation or
    test split is left out of that split's parts)."""
    from .data import load_splits
    from .errors import DataError

    out: dict[str, list[Part]] = {}
    for name, src in sources(data).items():
        settings, prompt_settings = source_settings(data, prompt, name)
        try:
            splits = load_splits(settings, require_valid=False)
        except DataError as e:
            raise DataError(f"data.sources.{name}: {str(e).replace('data.path=', 'path=')}") from None
        for split_name, split in splits.items():
            out.setdefault(split_name, []).append(Part(name, split, settings, prompt_settings, src.weight, src.epochs))
    if "valid" not in out:
        raise DataError("data=mix: no source has a validation split: give one a valid.jsonl (or valid_split)")
    return out


# ------------------------------------------------------------------------------------------------ sampling


def epoch_counts(sizes: list[int], weights: list, epochs: list, records_per_epoch: int | None) -> list[int]:
    """Records each source gives an epoch (see the module's docstring)."""
    fixed = [0 if w is not None else round((e if e is not None else 1) * n) for n, w, e in zip(sizes, weights, epochs)]
    weighted = [i for i, w in enumerate(weights) if w is not None]
    total = records_per_epoch if records_per_epoch is not None else sum(fixed) + sum(sizes[i] for i in weighted)
    rest = total - sum(fixed)
    if rest < 0 or (weighted and rest < len(weighted)) or (not weighted and rest):
        need = f"exactly {sum(fixed)}" if not weighted else f"at least {sum(fixed) + len(weighted)}"
        raise ConfigError(f"data.records_per_epoch={records_per_epoch}: the sources' epochs need {need} records per "
                          "epoch (each weighted source at least one): change it, or leave it null")
    counts = list(fixed)
    if weighted:
        scale = sum(weights[i] for i in weighted)
        shares = {i: rest * weights[i] / scale for i in weighted}
        for i in weighted:
            counts[i] = max(1, math.floor(shares[i]))
        left = rest - sum(counts[i] for i in weighted)
        for i in sorted(weighted, key=lambda i: (counts[i] - shares[i], i))[:max(0, left)]:
            counts[i] += 1  # largest remainders first
    return counts


def stream(size: int, name: str, seed: int, start: int, count: int) -> np.ndarray:
    """Items [start, start + count) of the source's endless stream of shuffled passes over range(size)."""
    out, first = [], start // size
    for p in range(first, (start + count - 1) // size + 1):
        perm = np.random.default_rng([seed, zlib.crc32(name.encode()), p]).permutation(size)
        lo, hi = max(start, p * size) - p * size, min(start + count, (p + 1) * size) - p * size
        out.append(perm[lo:hi])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


class Sampler:
    """Which records (indices into the concatenated sources) make up an epoch of the mixture."""

    def __init__(self, offsets: list[tuple[str, int, int]], weights: list, epochs: list,
                 records_per_epoch: int | None, seed: int):
        self.offsets, self.seed = offsets, seed
        self.counts = epoch_counts([e - s for _, s, e in offsets], weights, epochs, records_per_epoch)

    def __call__(self, epoch: int) -> list[int]:
        picks = [s + stream(e - s, name, self.seed, epoch * c, c) for (name, s, e), c in zip(self.offsets, self.counts)]
        return np.concatenate(picks).tolist()

    def per_source(self) -> dict[str, int]:
        return {name: c for (name, _, _), c in zip(self.offsets, self.counts)}


def counts_of(data, sizes: dict[str, int]) -> int:
    """Records per epoch of the mixture, from each source's train size (the schedule resolver's count)."""
    srcs = sources(data)
    return sum(epoch_counts([sizes[n] for n in srcs], [s.weight for s in srcs.values()],
                            [s.epochs for s in srcs.values()], data.records_per_epoch))
