#!/usr/bin/env bash
# Issue 23 on `nvidia-h200-x4` or `-x8` (after ../shared/device/stage.sh and its first call): tuning_fork's step
# on 1, 2, 4 (and 8, where there are eight) GPUs (mlx.launch --backend nccl), per GPU 1B 8x1024 or 8B 4x2048:
# the default (step.flat_update: one all-reduce and one optimizer update over the concatenated gradients), mlx's
# average_gradients and per-parameter update (tuning_fork+noflat), and 8 MB buckets reduced on a stream of their
# own beside the backward pass (streamed8).
# One shape per call (a call may run 10 minutes); logs and RESULT lines under $OUT.
#   bash benchmarks/four_gpu.sh 1b        then, in the next call,        bash benchmarks/four_gpu.sh 8b
set -u
shape=${1:-1b}
[ -d /tmp/tf-site/mlx ] || bash .device/p2/unpack.sh || exit 3
[ -e tuning_fork/conf ] || cp -r conf tuning_fork/conf
export PYTHONPATH=/tmp/tf-site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "$shape" = 8b ]; then b=4; s=2048; else b=8; s=1024; fi
run() {  # run N VARIANT
  local n=$1 v=$2
  if [ "$n" = 1 ]; then CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/gpu_step.py "$v" "$shape" $b $s
  else timeout 240 python3 -c "import sys; from mlx._distributed_utils.launch import main; sys.argv=['mlx.launch','-n','$n','--backend','nccl','--','python3','benchmarks/gpu_step.py']+sys.argv[1:]; sys.exit(main())" "$v" "$shape" $b $s
  fi 2>&1 | tee "$OUT/${shape}_${n}_${v}.log" | grep RESULT || echo "FAILED n=$n $v $shape"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
gpus=$(nvidia-smi -L | wc -l)
export BENCH_STEPS=30
run 1 tuning_fork
for n in 2 4 8; do
  [ "$n" -le "$gpus" ] || break
  run $n tuning_fork
  run $n tuning_fork+noflat
done
[ "${2:-}" = quick ] || run 4 streamed8
