"""`summary=true`: the data's statistics and the training plan, read at a glance; nothing is trained.

Loads only the tokenizer and the data; writes the same figures to RUN/summary.json (per split: records,
tokens, target tokens, records over max_seq_length, padding; the plan: iterations, intervals, warmup).
"""

from __future__ import annotations

import math
import shlex

from . import config as config_schema
from . import data, models, schedule


def padding(lengths, batches, max_seq_length: int, pad) -> float:
    """The fraction of the padded token grid that is padding, over the given batches."""
    real = padded = 0
    for b in batches:
        ls = [min(lengths[i], max_seq_length) for i in b]
        real += sum(ls)
        padded += len(b) * pad(max(ls))
    return 1 - real / padded if padded else 0.0


def packed_waste(lengths, batch_size: int, max_seq_length: int, seed: int) -> tuple[float, int]:
    """Padding waste of one epoch of packed rows, and how many rows that epoch holds."""
    real = padded = rows = 0
    for b in data.pack_order(lengths, batch_size, max_seq_length, seed, 0):
        totals = [min(max_seq_length, sum(min(lengths[i], max_seq_length) for i in row)) for row in b]
        real += sum(totals)
        padded += len(b) * data.pad_width(max(totals), max_seq_length)
        rows += len(b)
    return (1 - real / padded if padded else 0.0), rows


def batcher_waste(lengths, batch_size: int, max_seq_length: int, seed: int,
                  packing: bool = False) -> tuple[float, float, int | None]:
    """Padding waste of one epoch: tuning_fork's batches (length-aware, or packed) vs mlx-lm's (unsorted,
    in effect); and with packing, the rows the epoch holds."""
    import numpy as np

    rows = None
    if packing:
        ours, rows = packed_waste(lengths, batch_size, max_seq_length, seed)
    else:
        ours = padding(lengths, data.batch_order(lengths, batch_size, seed, 0), max_seq_length,
                       lambda m: data.pad_width(m, max_seq_length))
    perm = np.random.default_rng(seed).permutation(len(lengths))
    theirs_batches = [perm[i:i + batch_size] for i in range(0, len(perm) - batch_size + 1, batch_size)]
    theirs = padding(lengths, theirs_batches, max_seq_length, lambda m: min(max_seq_length, 1 + 32 * -(-m // 32)))
    return ours, theirs, rows


def summarize(cfg) -> dict:
    """Print the data's statistics and the plan; return both (and the equivalent mlx-lm command)."""
    from rich.console import Console

    config_schema.check(cfg)
    splits = data.load_splits(cfg.data, cfg.prompt)
    base = models.resolve(cfg.model.path)
    tokenizer = models.load_tokenizer(base, cfg.model.trust_remote_code)
    console = Console()
    out = {"splits": split_stats(cfg, splits, tokenizer, console)}
    out["plan"] = plan_of(cfg, out["splits"])
    console.print(plan_table(cfg, out["plan"]))
    out["mlx_lm_command"] = None  # mlx-lm's trainer has no preference objective: no equivalent to print
    if cfg.objective.name == "sft" and cfg.data.source != "mix":  # (mlx-lm reads one folder)
        out["mlx_lm_command"] = mlx_lm_command(cfg, base, out["plan"])
        console.print("the same run with mlx-lm (LoRA rank and scale go in a -c config file):")
        console.print(out["mlx_lm_command"], soft_wrap=True, highlight=False, markup=False)
    from .errors import ConfigError
    from .train import output_dir

    try:
        folder = output_dir(cfg)
    except ConfigError:  # called from Python without a run folder: nothing to write to
        return out
    folder.mkdir(parents=True, exist_ok=True)
    models.write_json(folder / "summary.json", out)
    return out


def split_stats(cfg, splits, tokenizer, console) -> dict:
    """Per split: records, tokens, mean and longest record, records over max_seq_length, records that
    train (data.too_long), padding of our batches and of mlx-lm's; packed rows for the train split. A
    mixture's splits also per source, and the train split's records per epoch from each."""
    from rich.table import Table

    max_len = cfg.data.max_seq_length
    stats = Table(title=f"data: {cfg.data.source}{' ' + str(cfg.data.path) if cfg.data.path else ''}")
    for col in ("split", "format", "records", "tokens", "mean", "max", f"> {max_len}",
                "pad (packed)" if cfg.data.packing else "pad (ours)", "pad (mlx-lm)"):
        stats.add_column(col, justify="left" if col in ("split", "format") else "right")
    out, notes = {}, []
    for name, split in splits.items():
        parts = [(p, encode_part(cfg, p, tokenizer, notes)) for p in data.split_parts(split, cfg.data, cfg.prompt)]
        whole = [sum((e[k] for _, e in parts), []) for k in range(3)]  # lengths, kept lengths, target tokens
        packing = cfg.data.packing and name == "train"  # validation and test are never packed
        out[name] = row = split_row(cfg, split.format, *whole, packing, stats, name)
        if split.parts:
            row["sources"] = {p.name: split_row(cfg, p.split.format, *e, False, stats, f"  {p.name}")
                              for p, e in parts}
            if name == "train":
                from .mixture import epoch_counts

                counts = epoch_counts([len(e[1]) for _, e in parts], [p.weight for p, _ in parts],
                                      [p.epochs for p, _ in parts], cfg.data.records_per_epoch)
                for (p, _), n in zip(parts, counts):
                    row["sources"][p.name]["records_per_epoch"] = n
                row["records_per_epoch"] = sum(counts)
                src = row["sources"].values()
                row["tokens_per_epoch"] = round(sum(r["tokens"] * r["records_per_epoch"] / r["records"] for r in src))
                notes.append("mixture: " + " + ".join(f"{p.name} {n:,} of {len(e[1]):,}" for (p, e), n in
                                                      zip(parts, counts)) + f" = {sum(counts):,} records per epoch")
    console.print(stats)
    for note in notes:
        console.print(f"tuning_fork: {note}", highlight=False, markup=False)
    return out


def encode_part(cfg, part, tokenizer, notes) -> tuple[list, list, list]:
    """(every record's length, the lengths of those that train (data.too_long), their target tokens); a
    preference pair is as long as its longer answer, its targets are both answers'."""
    max_len = cfg.data.max_seq_length
    if cfg.objective.name == "grpo":  # prompts: their tokens; the completions are sampled in training
        from .objectives.grpo import GRPO

        lengths = [len(p.ids) for p in GRPO(cfg).encode({part.split.name: part.split}, tokenizer)[part.split.name]]
        return [(n, n) for n in lengths], lengths, [0] * len(lengths)
    if cfg.objective.name != "sft":
        encoded = data.encode_pairs(part.split, tokenizer, part.data, part.prompt, notes)
        trained = data.limit_pairs(encoded, part.split, part.data)[0]
        length = lambda p: max(len(p[0]), len(p[2]))  # noqa: E731
        target = lambda p: data.targets(p[0], p[1], max_len) + data.targets(p[2], p[3], max_len)  # noqa: E731
        tokens = [len(p[0]) + len(p[2]) for p in encoded]
    else:
        encoded = data.encode_split(part.split, tokenizer, part.data, part.prompt, notes)
        trained = data.limit_lengths(encoded, part.split, part.data)[0]
        length, target = (lambda r: len(r[0])), (lambda r: data.targets(r[0], r[1], max_len))
        tokens = [len(r[0]) for r in encoded]
    lengths = [length(r) for r in encoded]
    return [(n, t) for n, t in zip(lengths, tokens)], [length(r) for r in trained], [target(r) for r in trained]


def split_row(cfg, fmt: str, sized: list, kept: list, target: list, packing: bool, table, label: str) -> dict:
    s, max_len = cfg.schedule, cfg.data.max_seq_length
    lengths = [n for n, _ in sized]
    ours, theirs, rows = batcher_waste(kept, min(s.batch_size, len(kept)), max_len, cfg.seed, packing)
    row = dict(records=len(lengths), tokens=sum(t for _, t in sized), target_tokens=sum(target),
               mean=sum(lengths) / len(lengths), max=max(lengths), too_long=sum(n > max_len for n in lengths),
               padding=ours, padding_mlx_lm=theirs, kept=len(kept))
    if rows is not None:
        row["rows"] = rows
    table.add_row(label, fmt, f"{row['records']:,}", f"{row['tokens']:,}", f"{row['mean']:.1f}", f"{row['max']:,}",
                  f"{row['too_long']:,}", f"{ours:.1%}", f"{theirs:.1%}")
    return row


def plan_of(cfg, stats: dict) -> dict:
    """The plan a run with this config follows, from the split statistics."""
    s, train = cfg.schedule, stats["train"]
    n_train = train.get("rows", train.get("records_per_epoch", train["kept"]))
    n_valid = stats["valid"]["kept"]
    p = schedule.plan(n_train, n_valid, s)
    p.update(schedule.run_plan(cfg, n_train, n_valid))  # what the run will use (explicit values kept)
    whole = -(-n_valid // s.batch_size)
    p["validated_records"] = n_valid if p["val_batches"] == -1 or p["val_batches"] >= whole else \
        min(n_valid, p["val_batches"] * s.batch_size)
    p["valid_records"] = n_valid
    p["validated_share"] = p["validated_records"] / n_valid
    p["optimizer_updates"] = math.ceil(p["iters"] / s.grad_accumulation_steps)
    p["tokens_per_epoch"] = train.get("tokens_per_epoch", train["tokens"])
    if "records_per_epoch" in train:
        p["records_per_epoch"] = train["records_per_epoch"]
    p["epochs"] = p["iters"] / p["steps_per_epoch"]
    if "rows" in train:
        p["packed_rows_per_epoch"] = train["rows"]
    return p


PLAN_ROWS = [("batches per epoch (E)", "steps_per_epoch", "{:,}"), ("epochs", "epochs", "{:.2f}"),
             ("records per epoch (mixture)", "records_per_epoch", "{:,}"), ("iterations", "iters", "{:,}"), ("optimizer updates", "optimizer_updates", "{:,}"),
             ("validate every", "steps_per_eval", "{:,} it"), ("report every", "steps_per_report", "{:,} it"),
             ("save every", "save_every", "{:,} it"), ("validation batches", "val_batches", "{:,}"),
             ("warmup", "warmup", "{:,} updates"),
             ("tokens per epoch", "tokens_per_epoch", "{:,}"), ("packed rows per epoch", "packed_rows_per_epoch", "{:,}")]


def plan_table(cfg, p: dict):
    from rich.table import Table

    table = Table(title="plan", show_header=False)
    table.add_column("", justify="left")
    table.add_column("", justify="right")
    for label, key, fmt in PLAN_ROWS:
        if key in p:
            table.add_row(label, fmt.format(p[key]))
    n_valid, sampled = p["valid_records"], p["validated_records"] < p["valid_records"]
    table.add_row("validated", f"{p['validated_records']:,} of {n_valid:,} records ({p['validated_share']:.0%})"
                  + (", a seeded sample stratified by length" if sampled else ""))
    if sampled and cfg.schedule.final_validation == "full":
        table.add_row("final validation", f"all {n_valid:,} records")
    return table


def mlx_lm_command(cfg, base: str, p: dict) -> str:
    s, a, d = cfg.schedule, cfg.adapter, cfg.data
    folder = str(data.data_folder(d))
    args = ["mlx_lm.lora", "--train", "--model", base, "--data", folder,
            "--fine-tune-type", models.fine_tune_type(a.type),
            "--num-layers", str(a.num_layers), "--batch-size", str(s.batch_size), "--iters", str(p["iters"]),
            "--val-batches", str(p["val_batches"]), "--learning-rate", str(s.learning_rate),
            "--steps-per-report", str(p["steps_per_report"]), "--steps-per-eval", str(p["steps_per_eval"]),
            "--save-every", str(p["save_every"]), "--max-seq-length", str(d.max_seq_length),
            "--grad-accumulation-steps", str(s.grad_accumulation_steps), "--optimizer", s.optimizer,
            "--seed", str(cfg.seed)]
    if d.mask_prompt:
        args.append("--mask-prompt")
    if s.grad_checkpoint:
        args.append("--grad-checkpoint")
    return shlex.join(args)
