"""How far a partial validation is from the whole split: the old way (the shortest records, as length-sorted
batches gave them) against tuning_fork's seeded sample stratified by length, before and after training.

Two data sets: the demo (12 validation records; val_batches=1 scores 8) and a skewed one made here (80
validation records, one in ten with an answer 20-40x longer; val_batches=2 scores 16 of them). Each is
trained with tuning_fork on the tiny model; the base model and the trained adapters are then scored on the
whole split, on the shortest records and on the sample.

    python benchmarks/validation_sample.py [--out /tmp/tf-valsample]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def skewed(folder: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "tuning fork pitch octave chord melody rhythm tempo timbre harmony cadence interval".split()
    folder.mkdir(parents=True, exist_ok=True)

    def record(i):
        count = rng.randint(80, 160) if i % 10 == 0 else rng.randint(2, 6)
        return {"messages": [{"role": "user", "content": f"Describe item {i}."},
                             {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(count))}]}

    for name, n in (("train", 160), ("valid", 80)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in range(n)))
    return folder


def scores(cfg, adapters: Path | None) -> dict:
    from mlx_lm import load

    from tuning_fork import data, models
    from tuning_fork.evaluation import evaluate, validation_sample
    from tuning_fork.objectives import build

    model, tokenizer = load(models.resolve("tiny"), adapter_path=str(adapters) if adapters else None)
    objective = build(cfg)
    records = objective.encode(data.load_splits(cfg.data), tokenizer)["valid"]
    lengths = objective.lengths(records)
    n = cfg.schedule.val_batches * cfg.schedule.batch_size
    shortest = sorted(range(len(records)), key=lambda i: lengths[i])[:n]
    sample = validation_sample(lengths, n, cfg.seed)
    loss = lambda idx: evaluate(model, objective.eval_batches(records, idx), objective.eval_loss)
    return {"records": f"{n} of {len(records)}", "whole": loss(None), "shortest": loss(shortest), "sample": loss(sample)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/tf-valsample")
    args = parser.parse_args()
    out = Path(args.out)
    from hydra import compose, initialize_config_module

    from tuning_fork import config
    from tuning_fork.train import train

    config.register()
    cases = {"demo": ["schedule.val_batches=1", "schedule.epochs=20"],
             "skewed": ["data=jsonl", f"data.path={skewed(out / 'skewed')}", "schedule.val_batches=2",
                        "schedule.epochs=10", "data.max_seq_length=512"]}
    rows = []
    for name, overrides in cases.items():
        with initialize_config_module("tuning_fork.conf"):
            cfg = compose("config", overrides=[*overrides, f"output_dir={out / name}-{random.randrange(1 << 30)}"])
        result = train(cfg)
        for when, adapters in (("before", None), ("after", Path(result["run_dir"]) / "adapters")):
            rows.append((name, when, scores(cfg, adapters)))
    print("| data | model | validated | whole split | shortest records (before) | stratified sample (now) |")
    print("|---|---|---|---|---|---|")
    for name, when, s in rows:
        print(f"| {name} | {when} training | {s['records']} | {s['whole']:.3f} | {s['shortest']:.3f} "
              f"({s['shortest'] - s['whole']:+.3f}) | {s['sample']:.3f} ({s['sample'] - s['whole']:+.3f}) |")


if __name__ == "__main__":
    main()
