#!/usr/bin/env bash
# Issue 18: where the CLI's loop loses half of its step's speed. The CLI on uniform 8x1024 batches (after
# benchmarks/multi_gpu.sh made /tmp/m1b and /tmp/uni), 60 iterations each: as it runs; with MLX's CUDA
# graphs (no host pacing); direct launches without the pacing's memory limit; and its train_step timed
# piecewise (dispatch, evaluation, host reads).
set -u
bash benchmarks/multi_gpu.sh model || exit 3
export PYTHONPATH=/tmp/tf-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=0
args="model.path=/tmp/m1b schedule=default adapter.rank=16 adapter.alpha=32 data=jsonl data.path=/tmp/uni schedule.batch_size=8 schedule.epochs=null schedule.iters=60 data.max_seq_length=1024 schedule.val_batches=2 schedule.steps_per_report=10"
median() { python3 -c "
import json, statistics as st
t = [json.loads(l) for l in open('$1/metrics.jsonl')]
t = [x['tokens_per_second'] for x in t if 'train_loss' in x][1:]
print('$2', 'median tok/s', round(st.median(t)))"; }
python3 -m tuning_fork $args hydra.run.dir=/tmp/b1 > /dev/null 2>&1; median /tmp/b1 "as it runs (direct, paced)"
MLX_USE_CUDA_GRAPHS=1 MLX_MAX_OPS_PER_BUFFER=20 python3 -m tuning_fork $args hydra.run.dir=/tmp/b2 > /dev/null 2>&1; median /tmp/b2 "CUDA graphs, no pacing"
python3 - $args hydra.run.dir=/tmp/b3 > /dev/null 2>&1 <<'PY'
import sys
import tuning_fork.train as T
real = T.HostPace
T.HostPace = lambda active: real(False)
sys.argv = ["tuning_fork"] + sys.argv[1:]
from tuning_fork.__main__ import cli
cli()
PY
median /tmp/b3 "direct, no pacing"
python3 - $args hydra.run.dir=/tmp/b4 2>&1 <<'PY' | grep "^##"
import sys, time, collections
import mlx.core as mx
import tuning_fork.train as T
spent = collections.Counter()
real_eval, real_seed = mx.eval, mx.random.seed
def timed(name, fn):
    def w(*a, **k):
        t = time.perf_counter(); r = fn(*a, **k); spent[name] += time.perf_counter() - t; return r
    return w
T.train_step = timed("train_step", T.train_step)
mx.eval = timed("mx.eval", mx.eval)
mx.random.seed = timed("mx.random.seed", mx.random.seed)
real_set = mx.set_memory_limit
mx.set_memory_limit = timed("set_memory_limit", mx.set_memory_limit)
orig_prepare = T.prepare_model
def prepare(run, resume_from):
    orig_prepare(run, resume_from)
    run.step = timed("step dispatch", run.step)
T.prepare_model = prepare
sys.argv = ["tuning_fork"] + sys.argv[1:]
from tuning_fork.__main__ import cli
try:
    cli()
finally:
    for k, v in spent.most_common():
        print(f"## {k}: {v:.2f} s")
PY
