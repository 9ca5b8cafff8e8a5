"""The token cache (issue 19): tokenizing a big chat set without the cache, filling it, reading it; and a
sweep's start-up per trial with and without it. CPU, the built-in model's tokenizer and chat template.

    python benchmarks/token_cache.py [--records 100000] [--out /tmp/tf-cache-bench]
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
    t = time.perf_counter()
    splits = data.load_splits(cfgs["true"].data)
    read = time.perf_counter() - t
    rows = {}
    for label, c in (("no cache", "false"), ("filling the cache", "true"), ("from the cache", "true")):
        t = time.perf_counter()
        sets = objectives.build(cfgs[c]).encode(splits, tokenizer)
        rows[label] = time.perf_counter() - t
        n = sum(len(ids) for ids, _ in sets["train"])
    print(f"{args.records:,} chat records ({n:,} tokens); reading and checking them: {read:.1f} s")
    for label, s in rows.items():
        print(f"  tokenizing, {label}: {s:.1f} s")

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
