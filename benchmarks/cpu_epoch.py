"""One epoch of the same LoRA training through `python -m mlx_lm lora` and through tuning_fork, on the CPU.

The built-in tiny model; batch 8; LoRA rank 16 on every linear of both blocks; max_seq_length 512. Both
processes get MKL (mlx-lm through LD_PRELOAD, tuning_fork by its import), so the comparison is of
batching and overhead, not BLAS. Two tables:
1. a skewed-length chat set (90% short records, 10% long): mlx-lm, tuning_fork bucketed, tuning_fork packed;
2. equal work: every record the same length, so both pad alike: tuning_fork's overhead over mlx-lm.

    python benchmarks/cpu_epoch.py [--records 400] [--max-seq-length 512] [--repeats 3] [--out /tmp/tf-bench]
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


def make_data(folder: Path, n: int, seed: int = 0, uniform: bool = False) -> None:
    """Skewed lengths (90% answers of 3-8 words, 10% of 150-250), or every answer the same length."""
    rng = random.Random(seed)
    words = "tuning fork pitch octave chord melody rhythm tempo timbre harmony cadence interval".split()
    folder.mkdir(parents=True, exist_ok=True)

    def record(i):
        long = rng.random() < 0.1
        count = 20 if uniform else rng.randint(150, 250) if long else rng.randint(3, 8)
        answer = " ".join(words[(i + k) % len(words)] if uniform else rng.choice(words) for k in range(count))
        return {"messages": [{"role": "user", "content": f"Question {i % 10}?"},
                             {"role": "assistant", "content": answer}]}

    for name, count in (("train", n), ("valid", 16)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in range(count)))


def timed(cmd, env=None) -> tuple[float, float]:
    """Wall seconds and peak resident memory (GB) of one process."""
    tic = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - tic
    if status != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1e6


def lengths_of(folder: Path, model: str) -> list[int]:
    from mlx_lm.utils import load_tokenizer
    from omegaconf import OmegaConf

    from tuning_fork import data as tf_data

    tok = load_tokenizer(model)
    cfg = OmegaConf.create({"source": "jsonl", "path": str(folder), "mask_prompt": False, "text_feature": "text",
                            "prompt_feature": "prompt", "completion_feature": "completion",
                            "chat_feature": "messages"})
    split = tf_data.load_splits(cfg)["train"]
    prompt = OmegaConf.create({"format": "tokenizer", "system": None})
    return [len(ids) for ids, _ in tf_data.encode_split(split, tok, cfg, prompt)]


def mlx_lm_run(out: Path, folder: Path, model: str, B: int, iters: int, max_len: int, name: str):
    (out / "lora.yaml").write_text("lora_parameters: {rank: 16, scale: 2.0, dropout: 0.0}\n")
    mkl = next((str(p) for p in (Path(sys.prefix) / "lib").glob("libmkl_rt.so.*")), None)
    return timed([sys.executable, "-m", "mlx_lm", "lora", "--train", "--model", model, "--data", str(folder),
                  "--batch-size", str(B), "--iters", str(iters), "--num-layers", "-1", "--learning-rate", "1e-3",
                  "--steps-per-eval", "100000", "--val-batches", "1", "--steps-per-report", "10",
                  "--save-every", "100000", "--max-seq-length", str(max_len),
                  "--adapter-path", str(out / name), "-c", str(out / "lora.yaml")],
                 env={"LD_PRELOAD": mkl} if mkl else None)


def tuning_fork_run(out: Path, folder: Path, B: int, max_len: int, name: str, *extra):
    return timed([sys.executable, "-m", "tuning_fork", "model=tiny", "data=jsonl", f"data.path={folder}",
                  "schedule.epochs=1", f"schedule.batch_size={B}", "schedule.learning_rate=1e-3",
                  "schedule.steps_per_eval=100000", "schedule.val_batches=1", "schedule.steps_per_report=10",
                  "schedule.save_every=100000", "adapter.rank=16", "adapter.alpha=32",
                  f"data.max_seq_length={max_len}", f"hydra.run.dir={out / name}", *extra])


def table(real: int, rows, base: float) -> None:
    print("| run | wall s | real tok/s | padded tok/s | padding | peak RSS GB | wall vs mlx-lm |")
    print("|---|---|---|---|---|---|---|")
    for name, (wall, rss), pad in rows:
        print(f"| {name} | {wall:.1f} | {real / wall:,.0f} | {real / (1 - pad) / wall:,.0f} | {pad:.1%} | "
              f"{rss:.2f} | {base / wall:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="/tmp/tf-bench")
    args = ap.parse_args()

    import tuning_fork  # noqa: F401  (MKL)
    from tuning_fork.models import tiny_model_path
    from tuning_fork.summary import batcher_waste

    out = Path(args.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    model, B, L = str(tiny_model_path()), 8, args.max_seq_length
    iters = -(-args.records // B)

    # 1. skewed lengths: mlx-lm, our length-bucketed batches, our packed rows
    folder = out / "skewed"
    make_data(folder, args.records)
    lengths = lengths_of(folder, model)
    ours_pad, mlx_pad = batcher_waste(lengths, B, L, seed=0)
    packed_pad = batcher_waste(lengths, B, L, seed=0, packing=True)[0]
    mlx_lm = mlx_lm_run(out, folder, model, B, iters, L, "mlx_lm_skewed")
    rows = [("mlx-lm lora", mlx_lm, mlx_pad),
            ("tuning_fork, length-bucketed", tuning_fork_run(out, folder, B, L, "tf_bucketed"), ours_pad),
            ("tuning_fork, packed", tuning_fork_run(out, folder, B, L, "tf_packed", "data.packing=true"),
             packed_pad)]
    print(f"skewed: {args.records} records, {sum(lengths):,} real tokens, batch {B}, max_seq_length {L}, "
          f"one epoch ({iters} iterations unpacked)")
    table(sum(lengths), rows, mlx_lm[0])

    # 2. equal work: every record the same length, so both batchers pad alike; what is left is overhead
    folder = out / "uniform"
    make_data(folder, args.records, uniform=True)
    lengths = lengths_of(folder, model)
    ours_pad, mlx_pad = batcher_waste(lengths, B, L, seed=0)
    theirs, ours = [], []
    for r in range(args.repeats):  # alternating, so that drift in the machine's speed hits both alike
        theirs.append(mlx_lm_run(out, folder, model, B, iters, L, f"mlx_lm_uniform{r}"))
        ours.append(tuning_fork_run(out, folder, B, L, f"tf_uniform{r}"))
    median = lambda runs: sorted(runs)[len(runs) // 2]
    rows = [("mlx-lm lora", median(theirs), mlx_pad), ("tuning_fork, length-bucketed", median(ours), ours_pad)]
    print(f"\nequal work: {args.records} records of {lengths[0]}-{max(lengths)} tokens, batch {B}, one epoch, "
          f"median of {args.repeats} alternating runs "
          f"(mlx-lm {', '.join(f'{w:.1f}' for w, _ in theirs)} s; tuning_fork {', '.join(f'{w:.1f}' for w, _ in ours)} s)")
    table(sum(lengths), rows, rows[0][1][0])
    print(f"\ntuning_fork's overhead: {rows[1][1][0] / rows[0][1][0] - 1:+.1%} of mlx-lm's wall time")


if __name__ == "__main__":
    main()
