"""Epoch arithmetic: mlx-lm's iteration counts and intervals derived from epochs and the data's size.

The derived keys of the `schedule` group default to `${tf.plan:KEY}`, an OmegaConf resolver registered when
tuning_fork is imported, so the plan shows in `--cfg job --resolve` and `.hydra/config.yaml`, and any value
set explicitly (`schedule.steps_per_eval=50`) is kept. With N training records, V validation records and
batch size B (global, across data-parallel ranks):

    E               = ceil(N / B)               batches per epoch; the batcher trains the last partial batch
    iters           = E * epochs                (epochs wins over iters; with neither, one epoch)
    steps_per_eval  = E / evals_per_epoch       else iters * validation_interval_proportion
    val_batches     = V * eval_proportion_of_total / B      with evals_per_epoch,
                      else validations_per_train_item * validation_interval_proportion * iters
    steps_per_report= iters * reporting_interval_proportion
    save_every      = E / saves_per_epoch       else iters * adapter_save_interval_proportion
    lr_schedule.warmup = updates * lr_schedule.warmup_proportion     (updates = ceil(iters / accumulation))

Fractions round down; every interval is then at least 1 and at most iters; val_batches never exceeds the
ceil(V / B) batches the validation set holds. The last iteration always validates and saves. Intervals may
also be written in units: `schedule.eval_every=0.25ep` or `=100it` (also report_every, checkpoint_every).
"""

from __future__ import annotations

import math
import os
import re

from .errors import ConfigError

DERIVED = ("iters", "steps_per_eval", "steps_per_report", "save_every", "val_batches")
_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ep|it)?\s*$")


def parse_interval(text, steps_per_epoch: int, key: str) -> int:
    """'0.25ep' -> a quarter of an epoch in iterations; '100it' or '100' -> 100 iterations."""
    m = _UNIT.match(str(text))
    if not m:
        raise ConfigError(f"schedule.{key}={text!r}: write a number of iterations ('100' or '100it') "
                          "or of epochs ('0.25ep')")
    value, unit = float(m.group(1)), m.group(2) or "it"
    return int(value * steps_per_epoch) if unit == "ep" else int(value)


def check_inputs(batch_size, epochs) -> None:
    """What the plan divides by: checked here, for the resolver (`--cfg job --resolve`) and every run."""
    if batch_size < 1:
        raise ConfigError(f"schedule.batch_size={batch_size!r} is invalid: use a batch size of at least 1")
    if epochs is not None and epochs <= 0:
        raise ConfigError(f"schedule.epochs={epochs!r} is invalid: use a positive number of epochs, or "
                          "epochs=null to train by iters")


def plan(n_train: int, n_valid: int, s, iters: int | None = None) -> dict:
    """The derived schedule for `s` (the schedule config; any mapping with its keys).

    `iters`: the iteration count when set explicitly; ignored when `s.epochs` is set (epochs win)."""
    get = s.get if hasattr(s, "get") else (lambda k, d=None: getattr(s, k, d))
    check_inputs(get("batch_size"), get("epochs"))
    B = int(get("batch_size"))
    E = max(1, math.ceil(n_train / B))
    epochs = get("epochs")
    if epochs is not None:
        iters = max(1, int(E * epochs))
    else:
        iters = max(1, int(iters)) if iters is not None else E

    def interval(x) -> int:
        return min(iters, max(1, int(x)))

    def pick(unit_key, per_epoch, proportion_key) -> int:
        """An interval: in units when given, else per epoch, else a proportion of the run."""
        if get(unit_key) is not None:
            return interval(parse_interval(get(unit_key), E, unit_key))
        if per_epoch:
            return interval(E / per_epoch)
        return interval(iters * get(proportion_key))

    evals = get("evals_per_epoch")
    steps_per_eval = pick("eval_every", evals, "validation_interval_proportion")
    steps_per_report = pick("report_every", None, "reporting_interval_proportion")
    save_every = pick("checkpoint_every", get("saves_per_epoch"), "adapter_save_interval_proportion")

    if evals:
        val_batches = int(n_valid * get("eval_proportion_of_total") / B)
    else:
        val_batches = int(get("validations_per_train_item") * get("validation_interval_proportion") * iters)
    val_batches = min(max(1, val_batches), max(1, math.ceil(n_valid / B)))

    return dict(steps_per_epoch=E, iters=iters, steps_per_eval=steps_per_eval, steps_per_report=steps_per_report,
                save_every=save_every, val_batches=val_batches, warmup=warmup_updates(get, iters))


def warmup_updates(get, iters: int) -> int:
    """Warmup in optimizer updates: a proportion of the run's updates (0 without one)."""
    lr = get("lr_schedule")
    proportion = lr.get("warmup_proportion") if lr is not None else None
    if proportion is None:
        return 0
    if not 0 <= proportion < 1:
        raise ConfigError(f"schedule.lr_schedule.warmup_proportion={proportion}: use a share of the run in [0, 1)")
    return int(proportion * math.ceil(iters / max(1, int(get("grad_accumulation_steps") or 1))))


# ------------------------------------------------------------------------------------------- resolvers

_counts_cache: dict = {}


def _counts(data) -> dict:
    from .data import count_records, data_folder, load_splits

    if data.source == "mix":  # train: the mixture's epoch; valid: every source's validation records
        from .mixture import counts_of, source_settings

        per = {name: _counts(source_settings(data, None, name)[0]) for name in data.sources}
        for name, c in per.items():
            if "train" not in c:
                raise ConfigError(f"data.sources.{name}.path={data.sources[name].path}: no train.jsonl there: fix "
                                  "the path, or set schedule.iters explicitly")
        return {"train": counts_of(data, {n: c.get("train", 0) for n, c in per.items()}),
                "valid": sum(c.get("valid", 0) for c in per.values())}
    if data.source == "hf":  # a hub data set tells its size only when loaded
        key = ("hf", data.path, data.hf_config, data.train_split, data.valid_split)
        if key not in _counts_cache:
            _counts_cache[key] = {n: len(sp.records) for n, sp in load_splits(data, require_valid=False).items()}
        return _counts_cache[key]

    folder = data_folder(data)
    key = (data.source, str(folder))
    if data.source in ("demo", "jsonl"):
        try:
            key += tuple(os.stat(os.path.join(folder, f"{n}.jsonl")).st_mtime_ns
                         for n in ("train", "valid") if os.path.exists(os.path.join(folder, f"{n}.jsonl")))
        except (TypeError, OSError):
            pass
    if key not in _counts_cache:
        _counts_cache[key] = count_records(data)
    return _counts_cache[key]


def _resolve_plan(key: str, *, _root_):
    data = _root_.data
    counts = _counts(data)
    if "train" not in counts:
        raise ConfigError(f"schedule.{key} is derived from the data's size, but data.path={data.path} has "
                          f"no train.jsonl: fix data.path, or set schedule.{key} explicitly")
    s = _root_.schedule
    explicit = None if key == "iters" or s.epochs is not None else s.iters  # (iters may itself be derived)
    return plan(counts["train"], counts.get("valid", 0), s, iters=explicit)[key]


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("tf.plan"):
        OmegaConf.register_resolver("tf.plan", _resolve_plan, annotation_validation="off")
    if not OmegaConf.has_resolver("tf.if_tiny"):
        OmegaConf.register_resolver("tf.if_tiny", _if_tiny, annotation_validation="off")


def _if_tiny(for_tiny, for_others, *, _root_):
    """`${tf.if_tiny:A,B}`: A when model.path is the built-in tiny model, else B. The tiny model's recipe
    (random weights: a high learning rate, many passes, a big rank) reaches no other model."""
    return for_tiny if _root_.model.path == "tiny" else for_others


def run_plan(cfg, units: int, n_valid: int) -> dict:
    """The schedule a run uses for `units` training rows per epoch (records after data.too_long, or packed
    rows): derived keys from the plan, explicit ones as set. (The resolver's values count the records in
    the files, which packing and dropped records change: a derived value is recomputed here.)"""
    from omegaconf import OmegaConf

    s = cfg.schedule
    derived_iters = s.epochs is not None or OmegaConf.is_interpolation(s, "iters")
    derived = plan(units, n_valid, s, iters=None if derived_iters else s.iters)
    out = {k: derived[k] if k == "iters" or OmegaConf.is_interpolation(s, k) else s[k] for k in DERIVED}
    for k in ("steps_per_eval", "steps_per_report", "save_every"):
        out[k] = min(out[k], out["iters"])
    derived_warmup = OmegaConf.is_interpolation(s.lr_schedule, "warmup")
    out["warmup"] = warmup_updates(s.get, out["iters"]) if derived_warmup else s.lr_schedule.warmup
    updates = math.ceil(out["iters"] / s.grad_accumulation_steps)
    if out["warmup"] > updates:
        raise ConfigError(f"schedule.lr_schedule.warmup={out['warmup']} updates is longer than the run "
                          f"({updates} optimizer updates): shorten the warmup or train longer")
    return out
