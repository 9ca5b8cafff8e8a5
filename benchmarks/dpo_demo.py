"""The sft_dpo demo pipeline, and how often the model prefers the right answer before and after DPO.

Runs `python -m tuning_fork pipeline=sft_dpo` (the tiny model: SFT on the demo conversations, then DPO on
the demo pairs: the right answer chosen, the same answer with a wrong number rejected), timing it, then
scores every pair with the SFT stage's adapters (the DPO stage's start and reference) and with the DPO
stage's adapters: the share of pairs whose chosen answer has the higher log-probability, and DPO's reward
accuracy (the chosen answer's log-probability rose more over the reference than the rejected one's).

    python benchmarks/dpo_demo.py [--out /tmp/tf-dpo-demo]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def logps(run_adapters: Path, split: str):
    import numpy as np
    from hydra import compose, initialize_config_module
    from mlx_lm import load

    from tuning_fork import config, data
    from tuning_fork.objectives import build
    from tuning_fork.objectives.preference import sequence_logps

    config.register()
    with initialize_config_module("tuning_fork.conf"):
        cfg = compose("config", overrides=["objective=dpo", "data.path=preference"])
    base = json.loads((run_adapters / "adapter_config.json").read_text())["model"]
    model, tokenizer = load(base, adapter_path=str(run_adapters))
    pairs = build(cfg).encode(data.load_splits(cfg.data), tokenizer)[split]
    chosen, rejected = [], []
    for k in range(0, len(pairs), 8):
        tokens, mask, _, _ = data.collate_pairs(pairs[k:k + 8], 2048)
        sums = np.array(sequence_logps(model, tokens, mask)[0])
        n = len(pairs[k:k + 8])
        chosen += list(sums[:n])
        rejected += list(sums[n:])
    return np.array(chosen), np.array(rejected)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/tf-dpo-demo")
    run = Path(parser.parse_args().out) / str(int(time.time()))
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tuning_fork", "pipeline=sft_dpo", f"hydra.run.dir={run}"],
                          cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - tic
    if proc.returncode:
        sys.exit(proc.stderr[-2000:])
    print(f"pipeline=sft_dpo: {seconds:.0f} s in all ({run})")
    print("| pairs | model | chosen more likely than rejected | reward accuracy vs the SFT reference |")
    print("|---|---|---|---|")
    for split in ("train", "valid"):
        sc, sr = logps(run / "sft" / "adapters" / "best", split)
        dc, dr = logps(run / "dpo" / "adapters", split)
        print(f"| {split} ({len(sc)}) | after SFT (DPO's start) | {(sc > sr).mean():.1%} | (0 by definition) |")
        print(f"| {split} ({len(sc)}) | after DPO | {(dc > dr).mean():.1%} | {((dc - sc) > (dr - sr)).mean():.1%} |")


if __name__ == "__main__":
    main()
