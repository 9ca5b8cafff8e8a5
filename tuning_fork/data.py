"""Data: reading and checking records, tokenizing them, and batching them (length-bucketed or packed).

Records are read and checked before any model loads, so a bad line costs seconds, not a model download.
Formats are mlx-lm's: {"text"}, {"prompt", "completion"}, {"messages"} (chat, optionally with "tools").
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import DataError

SPLITS = ("train", "valid", "test")
PAD_TO = 32  # the model's input width is a multiple of this: few distinct shapes keep mx.compile's cache small
PAD_TO_CUDA = 128  # on CUDA, MLX's kernels want it: 8x1024 inputs train at 60.9k tok/s, 8x1023 at 32.9k,
#                    8x1056 (32 x 33) at 44.4k, 8x1152 (128 x 9) at 60.9k on an H200 (BENCHMARKS.md)


def demo_dir() -> Path:
    return Path(__file__).parent / "demo"


def data_folder(data) -> Path:
    """The folder of a demo or jsonl data set (data=demo: the package's demo/, or its subfolder data.path)."""
    if data.source == "demo":
        return demo_dir() / data.path if data.path else demo_dir()
    return Path(data.path).expanduser()


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class Split:
    name: str
    origin: str  # file path or data set id, for messages
    records: list
    lines: list  # the line number of each record (1-based), for messages
    format: str  # chat | completions | text | preference (mixed: a mixture's sources differ)
    parts: list | None = None  # a mixture's split: each source's (mixture.Part), concatenated in `records`


def record_format(rec: dict, fields) -> str | None:
    if fields.chosen_feature in rec and fields.rejected_feature in rec:
        return "preference"
    if fields.prompt_feature in rec and fields.completion_feature in rec:
        return "completions"
    if fields.prompt_feature in rec and not {fields.chat_feature, fields.chosen_feature, fields.rejected_feature} & set(rec):
        return "prompts"  # a prompt alone, with fields for rewards (objective=grpo)
    if fields.chat_feature in rec:
        return "chat"
    if fields.text_feature in rec:
        return "text"
    return None


def _check_record(rec, fmt: str, fields) -> str | None:
    """What is wrong with one record of a known format, or None."""
    if fmt == "preference":
        return _check_preference(rec, fields)
    if fmt == "prompts":
        if not isinstance(rec[fields.prompt_feature], str):
            return f'"{fields.prompt_feature}" must be a string'
    elif fmt == "completions":
        for k in (fields.prompt_feature, fields.completion_feature):
            if not isinstance(rec[k], str):
                return f'"{k}" must be a string'
    elif fmt == "text":
        if not isinstance(rec[fields.text_feature], str) or not rec[fields.text_feature]:
            return f'"{fields.text_feature}" must be a non-empty string'
    else:
        problem = _check_messages(rec[fields.chat_feature], fields.chat_feature)
        return problem and problem.replace(f"{fields.chat_feature} message", "message")
    return None


def _check_messages(msgs, name: str) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return f'"{name}" must be a non-empty list of {{"role", "content"}} messages'
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f'{name} message {i} must be an object with a "role" string'
        if not isinstance(m.get("content"), str) and not m.get("tool_calls"):
            return f'{name} message {i} ({m["role"]}) must have a "content" string'
    return None


def _check_preference(rec, fields) -> str | None:
    """{"prompt", "chosen", "rejected"} strings (optional "system"), or chosen and rejected conversations that
    share every turn before their last assistant turn."""
    c, r = rec[fields.chosen_feature], rec[fields.rejected_feature]
    if isinstance(c, str) and isinstance(r, str):
        if not isinstance(rec.get(fields.prompt_feature), str):
            return f'a preference pair of strings needs a "{fields.prompt_feature}" string'
        if not isinstance(rec.get(fields.system_feature, ""), str):
            return f'"{fields.system_feature}" must be a string'
    elif isinstance(c, list) and isinstance(r, list):
        for msgs, name in ((c, fields.chosen_feature), (r, fields.rejected_feature)):
            if problem := _check_messages(msgs, name):
                return problem
            if msgs[-1].get("role") != "assistant":
                return f'the last message of "{name}" must be the assistant\'s answer'
        if c[:-1] != r[:-1]:
            return (f'"{fields.chosen_feature}" and "{fields.rejected_feature}" differ before their last assistant '
                    "turn: the turns before it are the shared prompt")
    else:
        return f'"{fields.chosen_feature}" and "{fields.rejected_feature}" must both be strings or both message lists'
    if c == r:
        return f'"{fields.chosen_feature}" and "{fields.rejected_feature}" are identical: nothing to prefer'
    return None


def _formats_help(fields) -> str:
    return (f'{{"{fields.text_feature}": ...}}, {{"{fields.prompt_feature}": ..., "{fields.completion_feature}": ...}}'
            f' or {{"{fields.chat_feature}": [{{"role": ..., "content": ...}}, ...]}}')


def check_records(name: str, origin: str, records: list, lines: list, fields) -> Split:
    """Every record must be an object in one format, with the right field types."""
    if not records:
        raise DataError(f"{origin}: the {name} split is empty: add records to it")
    fmt = None
    for rec, line in zip(records, lines):
        where = f"{origin}:{line}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: a record must be a JSON object, found {type(rec).__name__}")
        this = record_format(rec, fields)
        if this is None:
            raise DataError(f"{where}: no known fields in {sorted(rec)[:5]}: use {_formats_help(fields)}")
        if fmt is None:
            fmt, first = this, line
        elif this != fmt:
            raise DataError(f"{where}: a {this} record in a {fmt} split (line {first} is {fmt}): "
                            "use one format per data set")
        if problem := _check_record(rec, fmt, fields):
            raise DataError(f"{where}: {problem}")
    return Split(name, origin, records, lines, fmt)


class JsonlRecords:
    """The records of a JSONL file, read from disk as they are asked for: a split of a million records holds
    their byte offsets (8 bytes each), never their text. Iterating streams the file; a line that is not UTF-8
    JSON is an error naming it."""

    def __init__(self, path: Path):
        self.path = path
        offsets, lines, at = [], [], 0
        try:
            with open(path, "rb") as fh:
                for n, raw in enumerate(fh, 1):
                    if raw.strip():
                        offsets.append(at)
                        lines.append(n)
                    at += len(raw)
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({e.strerror})") from None
        self.offsets, self.lines = np.array(offsets, np.int64), np.array(lines, np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int):
        with open(self.path, "rb") as fh:
            fh.seek(int(self.offsets[i]))
            return self.parse(fh.readline(), int(self.lines[i]))

    def __iter__(self):
        with open(self.path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                if raw.strip():
                    yield self.parse(raw, n)

    def parse(self, raw: bytes, n: int):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{self.path}:{n}: not UTF-8 text: is this a JSONL file?") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{self.path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None


class Chained:
    """Several sequences read as one (a mixture's records, one source after another)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.ends = np.cumsum([len(p) for p in parts]).tolist()

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, i: int):
        import bisect

        k = bisect.bisect_right(self.ends, i)
        return self.parts[k][i - (self.ends[k - 1] if k else 0)]

    def __iter__(self):
        for p in self.parts:
            yield from p


def read_jsonl(path: Path) -> tuple[JsonlRecords, np.ndarray]:
    """(the file's records, read lazily; the line number of each)."""
    records = JsonlRecords(path)
    return records, records.lines


def load_splits(data, prompt=None, require_valid: bool = True) -> dict[str, Split]:
    """Read and check every split of `data` (the `data` config group). No tokenizer needed. A mixture's
    splits hold its sources' records one after another, with each source's settings in `parts` (`prompt`:
    the prompt group, which a source may change)."""
    if data.source == "mix":
        return mixed_splits(data, prompt)
    if data.source == "hf":
        return _load_hf(data, require_valid)
    folder = data_folder(data)
    if not folder.is_dir():
        raise DataError(f"data.path={data.path}: no such folder: point it at a folder holding "
                        "train.jsonl and valid.jsonl")
    splits = {}
    for name in SPLITS:
        path = folder / f"{name}.jsonl"
        if not path.exists():
            if name == "test" or (name == "valid" and not require_valid):
                continue
            raise DataError(f"{path}: missing: data.path needs train.jsonl and valid.jsonl "
                            "(test.jsonl is optional)")
        splits[name] = check_records(name, str(path), *read_jsonl(path), data)
    if "valid" in splits and splits["train"].format != splits["valid"].format:
        raise DataError(f"{splits['valid'].origin}: {splits['valid'].format} records, but train.jsonl holds "
                        f"{splits['train'].format} records: use one format for every split")
    return splits


def mixed_splits(data, prompt) -> dict[str, Split]:
    from .mixture import load_parts

    out = {}
    for name, parts in load_parts(data, prompt).items():
        formats = {p.split.format for p in parts}
        out[name] = Split(name, f"data.sources ({', '.join(p.name for p in parts)})",
                          Chained([p.split.records for p in parts]), Chained([p.split.lines for p in parts]),
                          formats.pop() if len(formats) == 1 else "mixed", parts)
    return out


def split_parts(split: Split, data, prompt) -> list:
    """A split as its sources: a mixture's parts, or the split itself with the data and prompt groups."""
    from .mixture import Part

    return split.parts or [Part("", split, data, prompt, None, None)]


def _load_hf(data, require_valid: bool = True) -> dict[str, Split]:
    try:
        import datasets
    except ImportError:
        raise DataError("data=hf needs the `datasets` package: pip install datasets") from None
    splits = {}
    for name, expr in (("train", data.train_split), ("valid", data.valid_split), ("test", data.test_split)):
        if expr is None:
            continue
        try:
            ds = datasets.load_dataset(data.path, data.hf_config, split=expr)
        except Exception as e:  # the hub's errors are many; name the data set and split
            raise DataError(f"data.path={data.path} split {expr!r}: cannot load it ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        splits[name] = check_records(name, f"{data.path}[{expr}]", ds, range(1, len(ds) + 1), data)  # (Arrow, on disk)
    if "valid" not in splits and require_valid:
        raise DataError("data=hf needs a validation split: set data.valid_split, e.g. "
                        "'data.valid_split=\"train[-10%:]\"' (quoted: Hydra reads brackets as a list)")
    return splits


def count_records(data) -> dict[str, int]:
    """Records per split, streaming the files (no parsing, no tokenizer): cheap enough for a resolver."""
    folder = data_folder(data)
    counts = {}
    for name in SPLITS:
        path = folder / f"{name}.jsonl"
        if path.exists():
            with open(path, "rb") as fh:
                counts[name] = sum(1 for line in fh if line.strip())
    return counts


# ------------------------------------------------------------------------------------------- tokenizing


def progress(items, n: int, what: str):
    """`items`, with a progress bar for big splits (tokenizing a million records takes minutes)."""
    if n < 20_000:
        return items
    from rich.progress import track

    return track(items, total=n, description=what, transient=True)


def encode_split(split: Split, tokenizer, data, prompt, notes: list | None = None) -> list[tuple[list[int], tuple]]:
    """Every record as training rows (token ids, target spans): text records train on every token; chat and
    prompt/completion records on their assistant turns with data.mask_prompt (see chat.py), else on every
    token. `notes` gets what encoding did (reasoning, rows, skipped records)."""
    from .chat import Conversations

    fields = data
    if split.format == "preference":
        raise DataError(f"{split.origin}: preference records (chosen/rejected) train with objective=dpo, orpo or "
                        "simpo; objective=sft needs text, prompt/completion or chat records")
    if split.format == "prompts":
        raise DataError(f"{split.origin}: prompt-only records (no \"{fields.completion_feature}\") train with "
                        "objective=grpo, which samples the completions; objective=sft needs prompt/completion, "
                        "chat or text records")
    if split.format == "text":
        if data.mask_prompt:
            raise DataError(f"{split.origin}: data.mask_prompt=true needs prompt/completion or chat "
                            "records; text records have no prompt to mask")
        out = []
        for rec in progress(split.records, len(split.records), f"tokenizing {split.name}"):
            ids = tokenizer.encode(rec[fields.text_feature])
            if not ids or ids[-1] != tokenizer.eos_token_id:
                ids.append(tokenizer.eos_token_id)
            out.append((np.array(ids, np.int32), ((0, len(ids)),)))  # (4 bytes a token, not a Python int's 36)
        return out
    chats = Conversations(tokenizer, prompt.format, data)
    out = []
    for rec, line in progress(zip(split.records, split.lines), len(split.records), f"tokenizing {split.name}"):
        messages, tools = conversation(rec, split.format, fields, prompt)
        out += [(np.array(ids, np.int32), spans) for ids, spans in chats.rows(messages, tools, f"{split.origin}:{line}")]
    return encoded(out, chats, split, notes, "record")


def encoded(out: list, chats, split: Split, notes: list | None, what: str) -> list:
    """`out`, once encoding's notes are passed on; none of a split left (all skipped) is an error."""
    if notes is not None:
        notes += chats.stats.notes(split.name, chats.keep)
    if not out:
        raise DataError(f"{split.origin}: every {split.name} {what} was skipped (data.mask_mismatch=skip): "
                        f"{chats.stats.skipped[0][1]}")
    return out


def preference_conversations(rec: dict, data, prompt) -> tuple[list, list, object]:
    """(chosen, rejected) conversations of a preference record: strings become a user turn and an assistant
    answer (after the record's "system", else prompt.system); chat form is taken as it is."""
    c, r = rec[data.chosen_feature], rec[data.rejected_feature]
    if isinstance(c, list):
        return c, r, rec.get("tools")
    head = [{"role": "user", "content": rec[data.prompt_feature]}]
    system = rec.get(data.system_feature) or prompt.system
    if system:
        head.insert(0, {"role": "system", "content": system})
    return head + [{"role": "assistant", "content": c}], head + [{"role": "assistant", "content": r}], None


def encode_pairs(split: Split, tokenizer, data, prompt, notes: list | None = None) -> list[list]:
    """Every preference record as [chosen ids, chosen spans, rejected ids, rejected spans, reference chosen
    log-prob, reference rejected log-prob] (the references filled in later, when the objective needs them).
    The prompt is never a target: each answer's span is its last assistant turn (see chat.py)."""
    from .chat import Conversations

    if split.format != "preference":
        raise DataError(f"{split.origin}: {split.format} records, but a preference objective needs pairs: "
                        f'{{"{data.prompt_feature}", "{data.chosen_feature}", "{data.rejected_feature}"}} '
                        f'or {{"{data.chosen_feature}": [messages], "{data.rejected_feature}": [messages]}}'
                        + (" (the demo's pairs: data.path=preference)" if data.source == "demo" else ""))
    from omegaconf import OmegaConf

    settings = OmegaConf.merge(data, {"train_on": "last_assistant", "mask_prompt": True})
    chats = Conversations(tokenizer, prompt.format, settings)
    out = []
    for rec, line in zip(split.records, split.lines):
        chosen, rejected, tools = preference_conversations(rec, data, prompt)
        where = f"{split.origin}:{line}"
        c, r = chats.rows(chosen, tools, where), chats.rows(rejected, tools, where)
        if c and r:
            (ci, cs), (ri, rs) = c[-1], r[-1]
            out.append([np.array(ci, np.int32), cs, np.array(ri, np.int32), rs, 0.0, 0.0])
    return encoded(out, chats, split, notes, "pair")


def limit_pairs(encoded: list, split: Split, data) -> tuple[list, str | None]:
    """data.too_long for pairs: it applies to the longer answer of a pair, and a pair either side of which
    has no target token within the limit is dropped (or refused under too_long=error)."""
    as_records = [(c, sc) if len(c) >= len(r) else (r, sr) for c, sc, r, sr, *_ in encoded]
    for i, (c, sc, r, sr, *_) in enumerate(encoded):  # the shorter target decides whether a pair can train
        if targets(c, sc, data.max_seq_length) <= 0 or targets(r, sr, data.max_seq_length) <= 0:
            as_records[i] = (as_records[i][0], ())
    kept, note = limit_lengths(as_records, split, data)
    if len(kept) == len(encoded):
        return encoded, note
    keep = {id(rec) for rec in kept}
    return [pair for pair, rec in zip(encoded, as_records) if id(rec) in keep], note and note.replace("records", "pairs")


def conversation(rec: dict, fmt: str, data, prompt) -> tuple[list, object]:
    """A completions or chat record as (messages, tools), the system prompt of `prompt` included."""
    if fmt == "completions":
        messages = [{"role": "user", "content": rec[data.prompt_feature]},
                    {"role": "assistant", "content": rec[data.completion_feature]}]
        if prompt.system:
            messages.insert(0, {"role": "system", "content": prompt.system})
        return messages, None
    return rec[data.chat_feature], rec.get("tools")


def generation_prompt(rec: dict, tokenizer, data, prompt) -> tuple[list[int], str]:
    """(prompt tokens up to the last assistant turn, with the generation prompt; that turn's text): what a
    task metric asks the model and the reference it scores the answer against."""
    from .chat import Conversations, split_reasoning

    if data.chosen_feature in rec and data.rejected_feature in rec:  # a preference pair: the chosen answer
        messages, _, tools = preference_conversations(rec, data, prompt)
    elif data.prompt_feature in rec and data.completion_feature not in rec:  # a prompt alone (grpo): its `answer`
        messages, tools = conversation({**rec, data.completion_feature: str(rec.get("answer", ""))}, "completions",
                                       data, prompt)
    else:
        fmt = "completions" if data.prompt_feature in rec and data.completion_feature in rec else "chat"
        messages, tools = conversation(rec, fmt, data, prompt)
    chats = Conversations(tokenizer, prompt.format, data)
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        return chats.prompt_ids(messages, tools), ""
    return chats.prompt_ids(messages[:last], tools), split_reasoning(messages[last])[1].strip()


def targets(ids: list[int], spans, limit: int) -> int:
    """How many tokens of a record the loss counts once it is cut to `limit` tokens (see collate): the
    tokens of its target spans, but never the first token (nothing predicts it)."""
    return sum(max(0, min(e, len(ids), limit) - max(s, 1)) for s, e in spans)


def limit_lengths(encoded: list, split: Split, data) -> tuple[list, str | None]:
    """Apply data.too_long to the records over data.max_seq_length tokens, and to the records left with no
    target token (a prompt as long as the limit under mask_prompt: it would train on nothing, and a batch
    of them would divide 0 by 0); say what was done, if anything."""
    limit = data.max_seq_length
    long = [i for i, (ids, _) in enumerate(encoded) if len(ids) > limit]
    empty = [i for i, (ids, spans) in enumerate(encoded) if targets(ids, spans, limit) <= 0]
    notes = []
    if long:
        longest = max(len(encoded[i][0]) for i in long)
        where = f"{split.origin}:{split.lines[long[0]]}"
        if data.too_long == "error":
            raise DataError(f"{where}: {len(long)} of {len(encoded)} {split.name} records are longer than "
                            f"data.max_seq_length={limit} tokens (longest {longest}): raise it, or set "
                            "data.too_long=truncate or drop")
        done = "dropped" if data.too_long == "drop" else "truncated"
        notes.append(f"{split.name}: {len(long)} of {len(encoded)} records are longer than data.max_seq_length="
                     f"{limit} tokens (longest {longest}, first at {where}): {done} (data.too_long=truncate|drop|error)")
    drop = set(long) if data.too_long == "drop" else set()
    if empty := [i for i in empty if i not in drop]:
        where = f"{split.origin}:{split.lines[empty[0]]}"
        what = (f"{len(empty)} of {len(encoded)} {split.name} records have no target token within data.max_seq_length="
                f"{limit} (the prompt fills it; first at {where})")
        if data.too_long == "error":
            raise DataError(f"{where}: {what}: raise data.max_seq_length, shorten the prompts, or set "
                            "data.too_long=drop")
        notes.append(f"{what}: dropped, as they would train on nothing")
        drop |= set(empty)
    if drop:
        encoded = [rec for i, rec in enumerate(encoded) if i not in drop]
        if not encoded:
            raise DataError(f"{split.origin}: no {split.name} record is left with a target token within "
                            f"data.max_seq_length={limit}: raise data.max_seq_length")
    return encoded, "; ".join(notes) or None


# --------------------------------------------------------------------------------------------- batching


def _windows(order, size: int):
    return [order[w:w + size] for w in range(0, len(order), size)]


def merge_short_tail(batches: list, min_batch: int) -> list:
    """A last batch smaller than `min_batch` (the data-parallel ranks) joins the one before it, so that
    every rank gets at least one row."""
    if len(batches) > 1 and len(batches[-1]) < min_batch:
        last = batches.pop()
        batches[-1] = [*batches[-1], *last]
    return batches


@functools.cache
def pad_multiple() -> int:
    """The input width's multiple on this machine (asked once: collate calls pad_width for every batch)."""
    import mlx.core as mx

    return PAD_TO_CUDA if mx.cuda.is_available() else PAD_TO


def pad_width(longest: int, max_seq_length: int, multiple: int | None = None) -> int:
    """The row width for a longest row of `longest` tokens (at most max_seq_length): the model reads all but
    the last token of a row, so that input width (the row's less one) is a multiple of `multiple`
    (pad_multiple(): 32, 128 on CUDA). A row of max_seq_length tokens gets one padding token at the end
    rather than an input width of max_seq_length - 1, which runs at half speed on CUDA."""
    multiple = multiple or pad_multiple()
    inputs = max(1, min(longest, max_seq_length) - 1)
    return multiple * -(-inputs // multiple) + 1


def batch_order(lengths, batch_size: int, seed: int, epoch: int, min_batch: int = 1) -> list[list[int]]:
    """One epoch's batches of record indices: every record exactly once, the last batch possibly short.

    Records are shuffled, then sorted by length within windows of 16 batches, so a batch holds records
    of similar length (little padding) while the batches themselves are shuffled: different every epoch,
    the same for the same seed. A last batch smaller than `min_batch` (the number of data-parallel ranks)
    joins the batch before it, so that every rank gets at least one record."""
    rng = np.random.default_rng([seed, epoch])
    idx = rng.permutation(len(lengths))
    batches = []
    for chunk in _windows(idx, batch_size * 16):
        chunk = sorted(chunk, key=lambda i: lengths[i])
        batches += _windows(chunk, batch_size)
    batches = merge_short_tail(batches, min_batch)
    order = rng.permutation(len(batches))
    return [[int(i) for i in batches[o]] for o in order]


def pack_order(lengths, batch_size: int, max_seq_length: int, seed: int, epoch: int,
               min_batch: int = 1) -> list[list[list[int]]]:
    """One epoch of packed batches: each batch holds `batch_size` rows, each row several records whose
    tokens fit in `max_seq_length` (a longer record is truncated and fills a row alone).

    Records are shuffled, then packed best-fit-decreasing within windows of 64 rows' worth of tokens,
    and the rows shuffled: every record exactly once, different every epoch, the same for the same seed."""
    import bisect

    rng = np.random.default_rng([seed, epoch])
    idx = rng.permutation(len(lengths))
    sizes = [min(n, max_seq_length) for n in lengths]
    windows, window, taken = [], [], 0
    for i in idx:
        if window and taken + sizes[i] > 64 * max_seq_length:
            windows.append(window)
            window, taken = [], 0
        window.append(int(i))
        taken += sizes[i]
    windows.append(window)
    rows: list[list[int]] = []
    for window in windows:
        free: list[tuple[int, int]] = []  # (room left, row number), sorted: best fit is the first that fits
        for r in sorted(window, key=lambda r: -sizes[r]):
            k = bisect.bisect_left(free, (sizes[r], -1))
            if k < len(free):
                room, row = free.pop(k)
                rows[row].append(r)
            else:
                room, row = max_seq_length, len(rows)
                rows.append([r])
            bisect.insort(free, (room - sizes[r], row))
    rows = [rows[o] for o in rng.permutation(len(rows))]
    return merge_short_tail(_windows(rows, batch_size), min_batch)


def mark(mask_row, spans, at: int, n: int) -> None:
    """Mark a record's target tokens in its row's loss mask: the record starts at `at`, `n` of its tokens fit.
    Position p of the mask predicts token p + 1, so token t is a target at p = t - 1 (never the first token)."""
    for s, e in spans:
        lo, hi = at + max(s, 1) - 1, at + min(e, n) - 1
        if hi > lo:
            mask_row[lo:hi] = True


def collate(rows, max_seq_length: int):
    """Pad records into one array: (tokens, loss mask). The mask marks the targets the loss counts (each
    record's target spans), never padding."""
    import mlx.core as mx

    lengths = [min(len(ids), max_seq_length) for ids, _ in rows]
    width = pad_width(max(lengths), max_seq_length)
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width - 1), bool)
    for j, (ids, spans) in enumerate(rows):
        tokens[j, :lengths[j]] = ids[:lengths[j]]
        mark(mask[j], spans, 0, lengths[j])
    return mx.array(tokens), mx.array(mask)


def collate_pairs(pairs, max_seq_length: int):
    """Preference pairs into (tokens, loss mask, reference chosen, reference rejected): the chosen answers in
    the first half of the rows, the rejected in the second, so both of a pair go through the model at once."""
    import mlx.core as mx

    tokens, mask = collate([(p[0], p[1]) for p in pairs] + [(p[2], p[3]) for p in pairs], max_seq_length)
    return (tokens, mask, mx.array([p[4] for p in pairs], mx.float32), mx.array([p[5] for p in pairs], mx.float32))


def collate_packed(rows, max_seq_length: int):
    """Packed rows into (tokens, loss mask, segments): `segments` numbers the records of each row (1, 2, ...;
    0 is padding) so that attention stays within a record, and no target crosses a record boundary."""
    import mlx.core as mx

    totals = [sum(min(len(ids), max_seq_length) for ids, _ in row) for row in rows]
    width = pad_width(max(totals), max_seq_length)
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width - 1), bool)
    segments = np.zeros((len(rows), width), np.int32)
    for j, row in enumerate(rows):
        at = 0
        for s, (ids, spans) in enumerate(row, 1):
            n = min(len(ids), max_seq_length - at)
            tokens[j, at:at + n] = ids[:n]
            segments[j, at:at + n] = s
            mark(mask[j], spans, at, n)
            at += n
    return mx.array(tokens), mx.array(mask), mx.array(segments)


class Batcher:
    """Batches of our data, length-aware, seeded, and training the last partial batch.

    `train(dataset, start)` yields training batches forever from step `start` on (a resumed run picks up
    where it stopped); `fixed(dataset, indices)` yields evaluation batches in a fixed order, sorted by
    length. With several data-parallel ranks each rank takes its share of every batch."""

    def __init__(self, batch_size: int, max_seq_length: int, seed: int = 0, packing: bool = False,
                 rank: int = 0, size: int = 1, length=None, collate_rows=None):
        self.batch_size, self.max_seq_length, self.seed, self.packing = batch_size, max_seq_length, seed, packing
        self.rank, self.size = rank, size
        self.length = length or (lambda rec: len(rec[0]))  # what a record's length is (pairs: the longer answer)
        self.collate = collate_rows or collate  # records to arrays
        self.sample = None  # a mixture's epochs: epoch -> the indices of its records (mixture.Sampler)

    def indices(self, n: int, epoch: int):
        """The records (indices) epoch `epoch` trains: every record once, or the mixture's draw."""
        return self.sample(epoch) if self.sample is not None else range(n)

    def epoch(self, lengths: list[int], epoch: int) -> list:
        if self.packing:
            return pack_order(lengths, self.batch_size, self.max_seq_length, self.seed, epoch, self.size)
        return batch_order(lengths, self.batch_size, self.seed, epoch, self.size)

    def rows_per_epoch(self, dataset) -> int:
        """Rows an epoch trains: records, or packed rows (each holding several records)."""
        idx = self.indices(len(dataset), 0)
        if not self.packing:
            return len(idx)
        return sum(len(batch) for batch in self.epoch([self.length(dataset[i]) for i in idx], 0))

    def train(self, dataset, start: int = 0) -> Iterator:
        lengths = [self.length(rec) for rec in dataset]
        done, epoch = 0, 0
        while True:
            idx = self.indices(len(dataset), epoch)
            for batch in self.epoch([lengths[i] for i in idx], epoch):
                if done >= start:
                    mine = batch[self.rank::self.size]
                    if self.packing:
                        yield collate_packed([[dataset[idx[i]] for i in row] for row in mine], self.max_seq_length)
                    else:
                        yield self.collate([dataset[idx[i]] for i in mine], self.max_seq_length)
                done += 1
            epoch += 1

    def fixed(self, dataset, indices: list[int] | None = None) -> Iterator:
        """Evaluation batches over `indices` (default: every record) in a fixed order, sorted by length so
        that rows of a batch are alike; each rank takes its share of every batch."""
        lengths = [self.length(rec) for rec in dataset]
        order = sorted(range(len(dataset)) if indices is None else indices, key=lambda i: (lengths[i], i))
        for batch in merge_short_tail(_windows(order, self.batch_size), self.size):
            if mine := batch[self.rank::self.size]:  # (a set smaller than the ranks leaves some with none)
                yield self.collate([dataset[i] for i in mine], self.max_seq_length)

    def count(self, n: int) -> int:
        """How many evaluation batches `n` records make."""
        return len(merge_short_tail(_windows(list(range(n)), self.batch_size), self.size))
