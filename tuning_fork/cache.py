"""The token cache: tokenized splits on disk, shared by every trial of a sweep and every rerun.

An entry is keyed by what decides its tokens: the split's contents (the file's bytes, or a hub data set's
records), the tokenizer (its files and chat template), the prompt format and system prompt, the objective,
every data setting (mask_prompt, train_on, reasoning, max_seq_length, too_long, field names, ...) and the
encoder's version. Change any of them and the key changes; nothing is ever invalidated in place.

An entry is a folder of NumPy arrays, read memory-mapped (rows stay on disk until a batch needs them):
    tokens.npy   every row's token ids, one after another (int32)
    starts.npy   where each row starts in tokens, and the end (int64, rows + 1)
    spans.npy    target spans as (row, start, end) (int32)
    meta.json    what encoding said (notes), rows per column
Preference pairs keep two columns (chosen, rejected) under c0_ and c1_ prefixes. A process writes its entry
into a folder of its own and renames it into place: a reader sees a whole entry or none, and two processes
filling one entry both succeed (the second's copy is dropped).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

VERSION = 2  # bump when the encoder's output changes for the same inputs


def folder() -> Path:
    from .models import cache_dir

    return cache_dir() / "tokens"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def records_digest(records) -> str:
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps(rec, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def split_digest(split) -> str:
    """The split's contents: its file's bytes when it came from one, else its records."""
    path = Path(split.origin)
    return file_digest(path) if path.is_file() else records_digest(split.records)


def tokenizer_digest(tokenizer) -> str:
    """The tokenizer's files (vocabulary, merges, special tokens, chat template) and its chat template now."""
    h = hashlib.sha256()
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    source = Path(str(getattr(hf, "name_or_path", "") or ""))
    if source.is_dir():
        for name in sorted(os.listdir(source)):
            if name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges", "added_tokens")):
                h.update(name.encode())
                h.update(file_digest(source / name).encode())
    else:
        h.update(json.dumps(hf.get_vocab(), sort_keys=True).encode())
    h.update(str(getattr(hf, "chat_template", None)).encode())
    return h.hexdigest()


def key(split, tokenizer_id: str, settings: dict) -> str:
    parts = {"version": VERSION, "split": split.name, "format": split.format, "contents": split_digest(split),
             "tokenizer": tokenizer_id, **settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------ entries


def _save_column(out: Path, prefix: str, rows) -> None:
    lengths = np.array([len(ids) for ids, _ in rows], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.empty(int(starts[-1]), np.int32)
    spans = []
    for r, (ids, row_spans) in enumerate(rows):
        tokens[starts[r]:starts[r + 1]] = ids
        spans += [(r, s, e) for s, e in row_spans]
    np.save(out / f"{prefix}tokens.npy", tokens)
    np.save(out / f"{prefix}starts.npy", starts)
    np.save(out / f"{prefix}spans.npy", np.array(spans, np.int32).reshape(-1, 3))


def _load_column(entry: Path, prefix: str) -> list:
    tokens = np.load(entry / f"{prefix}tokens.npy", mmap_mode="r")
    starts = np.load(entry / f"{prefix}starts.npy")
    spans = np.load(entry / f"{prefix}spans.npy")
    by_row: list[list] = [[] for _ in range(len(starts) - 1)]
    for r, s, e in spans.tolist():
        by_row[r].append((s, e))
    return [(tokens[starts[r]:starts[r + 1]], tuple(by_row[r])) for r in range(len(starts) - 1)]


def load(k: str) -> tuple[list, list] | None:
    """(columns, notes) of entry `k`, or None when there is none (or it cannot be read)."""
    entry = folder() / k
    try:
        meta = json.loads((entry / "meta.json").read_text())
        return [_load_column(entry, f"c{i}_") for i in range(meta["columns"])], meta["notes"]
    except (OSError, ValueError, KeyError):
        return None


def store(k: str, columns: list, notes: list) -> None:
    """Write entry `k` (columns: lists of (ids, spans) rows) unless another process already has."""
    root = folder()
    root.mkdir(parents=True, exist_ok=True)
    if (root / k).exists():
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{k}-", dir=root))
    try:
        for i, rows in enumerate(columns):
            _save_column(tmp, f"c{i}_", rows)
        (tmp / "meta.json").write_text(json.dumps({"columns": len(columns), "notes": notes}))
        try:
            os.rename(tmp, root / k)
        except OSError:  # another process put the same entry in place first: theirs is identical
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
