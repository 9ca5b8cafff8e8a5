"""The token cache (issue 19): tokenizing a big chat set without the cache, filling it, reading it; and a
sweep's start-up per trial with and without it. CPU, the built-in model's tokenizer and chat template.

    python benchmarks/token_cache.py [--records 100000] [--out /tmp/tf-cache-bench] [--memory-only]

Peak memory is the process's (ru_maxrss): reading the records keeps their byte offsets, not their text, and
tokenized records are int32 arrays (tokenizing keeps no Python list of ints).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path


def peak_rss() -> float:
    """The process's peak resident memory so far, MB (Linux reports kB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_data(folder: Path, n: int) -> None:
    rng = random.Random(0)
    words = "tuning fork pitch octave chord melody rhythm tempo timbre harmony cadence interval".split()
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", n), ("valid", 200)):
        with open(folder / f"{name}.jsonl", "w") as f:
            for i in range(count):
                q = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))
                a = " ".join(rng.choice(words) for _ in range(rng.randint(10, 120)))
                f.write(json.dumps({"messages": [{"role": "user", "content": q + "?"},
                                                 {"role": "assistant", "content": a}]}) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--out", default="/tmp/tf-cache-bench")
    ap.add_argument("--memory-only", action="store_true", help="skip the sweep")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    make_data(out / "data", args.records)
    os.environ["TUNING_FORK_CACHE"] = str(out / "cache")  # a cache of its own (the tiny model is rebuilt there)

    import tuning_fork  # noqa: F401
    from hydra import compose, initialize_config_module

    from tuning_fork import config, data, models, objectives

    config.register()
    overrides = ["data=jsonl", f"data.path={out / 'data'}", "data.mask_prompt=true"]
    with initialize_config_module("tuning_fork.conf"):
        cfgs = {c: compose("config", overrides=overrides + [f"data.cache={c}"]) for c in ("false", "true")}
    tokenizer = models.load_tokenizer(models.resolve("tiny"))
    t, rss = time.perf_counter(), peak_rss()
    splits = data.load_splits(cfgs["true"].data)
    read, read_rss = time.perf_counter() - t, peak_rss()
    rows = {}
    for label, c in (("no cache", "false"), ("filling the cache", "true"), ("from the cache", "true")):
        t = time.perf_counter()
        sets = objectives.build(cfgs[c]).encode(splits, tokenizer)
        rows[label] = time.perf_counter() - t, peak_rss()
        n = sum(len(ids) for ids, _ in sets["train"])
        del sets
    print(f"{args.records:,} chat records ({n:,} tokens, {os.path.getsize(out / 'data' / 'train.jsonl') / 1e6:,.0f} MB "
          f"of JSONL); reading and checking them: {read:.1f} s, peak memory {rss:,.0f} -> {read_rss:,.0f} MB")
    for label, (s, m) in rows.items():
        print(f"  tokenizing, {label}: {s:.1f} s, peak memory of the process so far {m:,.0f} MB")
    if args.memory_only:
        return

    sweep = [sys.executable, "-m", "tuning_fork", "--multirun", *overrides, "debug=fast", "schedule.iters=2",
             "schedule.steps_per_eval=2", "schedule.val_batches=1", "schedule.final_validation=sample",
             "adapter.rank=4,8,16"]
    for c in ("false", "true"):
        t = time.perf_counter()
        proc = subprocess.run(sweep + [f"data.cache={c}", f"hydra.sweep.dir={out / ('sweep-' + c)}"],
                              capture_output=True, text=True)
        s = time.perf_counter() - t
        assert proc.returncode == 0, proc.stderr[-2000:]
        print(f"  a sweep of 3 trials (2 iterations each), data.cache={c}: {s:.1f} s, {s / 3:.1f} s a trial")


if __name__ == "__main__":
    main()
