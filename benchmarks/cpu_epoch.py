"""One epoch of the same LoRA training through `python -m mlx_lm lora` and through tuning_fork, on the CPU.

The built-in tiny model; a skewed-length chat set (90% short records, 10% long); batch 8; LoRA rank 16
on every linear of both blocks. Both processes get MKL (mlx-lm through LD_PRELOAD, tuning_fork by its
import), so the comparison is of batching and overhead, not BLAS. Prints a table.

    python benchmarks/cpu_epoch.py [--records 400] [--out /tmp/tf-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path


def make_data(folder: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = "tuning fork pitch octave chord melody rhythm tempo timbre harmony cadence interval".split()
    folder.mkdir(parents=True, exist_ok=True)

    def record(i):
        long = rng.random() < 0.1
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(150, 250) if long else rng.randint(3, 8)))
        return {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answer}]}

    for name, count in (("train", n), ("valid", 16)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in range(count)))


def timed(cmd, env=None) -> float:
    tic = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - tic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--out", default="/tmp/tf-bench")
    args = ap.parse_args()

    import tuning_fork  # noqa: F401  (MKL)
    from mlx_lm.utils import load_tokenizer
    from omegaconf import OmegaConf

    from tuning_fork import data as tf_data
    from tuning_fork.models import tiny_model_path
    from tuning_fork.summary import batcher_waste

    out = Path(args.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    folder, model = out / "data", str(tiny_model_path())
    make_data(folder, args.records)
    B, iters = 8, -(-args.records // 8)

    tok = load_tokenizer(model)
    cfg = OmegaConf.create({"source": "jsonl", "path": str(folder), "mask_prompt": False, "text_feature": "text",
                            "prompt_feature": "prompt", "completion_feature": "completion",
                            "chat_feature": "messages"})
    split = tf_data.load_splits(cfg)["train"]
    lengths = [len(ids) for ids, _ in tf_data.encode_split(split, tok, cfg, OmegaConf.create({"format": "tokenizer",
                                                                                              "system": None}))]
    real = sum(lengths)
    ours_pad, mlx_pad = batcher_waste(lengths, B, 2048, seed=0)

    (out / "lora.yaml").write_text("lora_parameters: {rank: 16, scale: 2.0, dropout: 0.0}\n")
    mkl = next((str(p) for p in (Path(sys.prefix) / "lib").glob("libmkl_rt.so.*")), None)
    mlx_lm_s = timed([sys.executable, "-m", "mlx_lm", "lora", "--train", "--model", model, "--data", str(folder),
                      "--batch-size", str(B), "--iters", str(iters), "--num-layers", "-1", "--learning-rate", "1e-3",
                      "--steps-per-eval", "100000", "--val-batches", "1", "--steps-per-report", "10",
                      "--save-every", "100000", "--adapter-path", str(out / "mlx_lm_adapters"),
                      "-c", str(out / "lora.yaml")], env={"LD_PRELOAD": mkl} if mkl else None)
    tf_s = timed([sys.executable, "-m", "tuning_fork", "model=tiny", "data=jsonl", f"data.path={folder}",
                  "schedule.epochs=1", f"schedule.batch_size={B}", "schedule.learning_rate=1e-3",
                  "schedule.steps_per_eval=100000", "schedule.val_batches=1", "schedule.steps_per_report=10",
                  "schedule.save_every=100000", "adapter.rank=16", "adapter.alpha=32",
                  f"hydra.run.dir={out / 'tf_run'}"])

    rows = [("mlx-lm lora", mlx_lm_s, mlx_pad), ("tuning_fork (length-bucketed)", tf_s, ours_pad)]
    print(f"{args.records} records, {real:,} real tokens, batch {B}, {iters} iterations (one epoch)")
    print(f"| run | wall s | real tok/s | padded tok/s | padding | wall vs mlx-lm |")
    print(f"|---|---|---|---|---|---|")
    for name, s, pad in rows:
        print(f"| {name} | {s:.1f} | {real / s:,.0f} | {real / (1 - pad) / s:,.0f} | {pad:.1%} | "
              f"{mlx_lm_s / s:.2f}x |")


if __name__ == "__main__":
    main()
