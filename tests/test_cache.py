"""The token cache: a rerun (or a sweep's next trial) reuses tokenized splits, any change of what decides the
tokens makes a new entry, and two processes filling one entry never corrupt it."""

import json
import subprocess
import sys
from pathlib import Path

from .conftest import compose_cfg, make_data, pairs_data, write_jsonl


def encode(*overrides):
    from tuning_fork import data, models, objectives

    cfg = compose_cfg(*overrides)
    tokenizer = models.load_tokenizer(models.resolve(cfg.model.path))
    objective = objectives.build(cfg)
    return objective, objective.encode(data.load_splits(cfg.data), tokenizer)


def entries() -> set:
    from tuning_fork import cache

    return {p.name for p in cache.folder().iterdir() if not p.name.startswith(".")} if cache.folder().exists() else set()


def plain(rows):
    return [([int(t) for t in ids], tuple(spans)) for ids, spans in rows]


def test_a_rerun_reads_the_cache_and_gets_the_same_rows(tmp_path):
    folder = make_data(tmp_path / "d", n_train=21, n_valid=5)  # (sizes of its own: the cache keys contents)
    args = ("data=jsonl", f"data.path={folder}", "data.mask_prompt=true")
    before = entries()
    first, fresh = encode(*args)
    assert first.cached == {"train": False, "valid": False}
    filled = entries()
    assert len(filled - before) == 2  # train and valid
    again, cached = encode(*args)
    assert again.cached == {"train": True, "valid": True}
    for name in fresh:
        assert plain(cached[name]) == plain(fresh[name])
    assert entries() == filled  # nothing new


def test_any_change_of_what_decides_the_tokens_is_a_new_entry(tmp_path):
    folder = make_data(tmp_path / "d", n_train=22, n_valid=13)  # (sizes no other test uses: the cache keys contents)
    base = ("data=jsonl", f"data.path={folder}")
    encode(*base)
    changes = [("data.mask_prompt=true",), ("prompt=llama3",), ("prompt.system=Be brief.",),
               ("data.max_seq_length=16",), ("data.reasoning=drop", "data.mask_prompt=true")]
    seen = entries()
    for change in changes:
        encode(*base, *change)
        new = entries() - seen
        assert len(new) == 2, change  # train and valid again
        seen |= new
    records = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
    write_jsonl(folder / "train.jsonl", records + records[:1])  # the file's contents
    objective, _ = encode(*base)
    assert objective.cached == {"train": False, "valid": True}
    pairs = pairs_data(tmp_path / "p", n_train=13)  # the objective (pairs tokenize into two columns)
    objective, first = encode("data=jsonl", f"data.path={pairs}", "objective=dpo")
    objective, again = encode("data=jsonl", f"data.path={pairs}", "objective=dpo")
    assert objective.cached["train"] and [len(p) for p in again["train"]] == [6] * len(first["train"])
    assert [list(p[0]) for p in again["train"]] == [list(p[0]) for p in first["train"]]


def test_a_changed_chat_template_is_a_new_entry(tmp_path):
    import shutil

    from tuning_fork.models import resolve

    model = tmp_path / "m"
    shutil.copytree(resolve("tiny"), model)
    folder = make_data(tmp_path / "d", n_train=23, n_valid=7)
    args = ("data=jsonl", f"data.path={folder}", f"model.path={model}", "data.mask_prompt=true")
    encode(*args)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("<|im_start|>", "<|im_start|> ")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    objective, _ = encode(*args)
    assert objective.cached == {"train": False, "valid": False}


FILL = """
import sys
from tests.conftest import compose_cfg
from tuning_fork import data, models, objectives
cfg = compose_cfg("data=jsonl", "data.path=" + sys.argv[1])
tokenizer = models.load_tokenizer(models.resolve("tiny"))
objective = objectives.build(cfg)
rows = objective.encode(data.load_splits(cfg.data), tokenizer)
print("ROWS", len(rows["train"]), sum(len(ids) for ids, _ in rows["train"]))
"""


def test_two_processes_filling_one_entry(tmp_path):
    from tuning_fork import cache

    folder = make_data(tmp_path / "d", n_train=400)
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", FILL, str(folder)], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    lines = [next(x for x in o[0].splitlines() if x.startswith("ROWS")) for o in outs]
    assert lines[0] == lines[1]
    assert not [p for p in cache.folder().iterdir() if p.name.startswith(".")]  # no half-written entry left
    objective, rows = encode("data=jsonl", f"data.path={folder}")
    assert objective.cached["train"] and len(rows["train"]) == 400


def test_the_run_header_says_whether_the_cache_was_used(tmp_path, capsys):
    from tuning_fork.train import train

    folder = make_data(tmp_path / "d", n_train=25, n_valid=9)
    for n in (1, 2):
        train(compose_cfg("data=jsonl", f"data.path={folder}", "debug=fast", "adapter.rank=2",
                          f"output_dir={tmp_path / f'run{n}'}"))
        out = capsys.readouterr().out
        assert ("cached tokens" in out) == (n == 2) and ("tokenized, cached" in out) == (n == 1), out
    train(compose_cfg("data=jsonl", f"data.path={folder}", "debug=fast", "data.cache=false",
                      f"output_dir={tmp_path / 'run3'}"))
    out = capsys.readouterr().out
    assert "cached tokens" not in out and "tokenized" in out


def test_a_write_that_fails_midway_leaves_no_entry(tmp_path, monkeypatch):
    """An entry appears whole or not at all: a writer that dies after its first array leaves nothing a
    reader could take for an entry."""
    import numpy as np

    from tuning_fork import cache

    rows = [([1, 2, 3], ((1, 3),)), ([4, 5], ((0, 2),))]
    saved = []

    def dying_save(path, array):
        if saved:
            raise OSError("disk full")
        saved.append(path)
        np.lib.format.write_array(open(path, "wb"), np.asarray(array))

    monkeypatch.setattr(cache.np, "save", dying_save)
    try:
        cache.store("interrupted", [rows], [])
    except OSError:
        pass
    assert saved and cache.load("interrupted") is None and not (cache.folder() / "interrupted").exists()
    assert not [p for p in cache.folder().iterdir() if p.name.startswith(".interrupted")]
    monkeypatch.undo()
    cache.store("interrupted", [rows], ["a note"])
    (got,), notes = cache.load("interrupted")
    assert [([int(t) for t in ids], spans) for ids, spans in got] == [([1, 2, 3], ((1, 3),)), ([4, 5], ((0, 2),))]
    assert notes == ["a note"]
