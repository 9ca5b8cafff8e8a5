#!/usr/bin/env bash
# Issue 23 on `nvidia-h200-x4` (after ../shared/device/stage.sh and its first call): tuning_fork's step on 1, 2
# and 4 GPUs (mlx.launch --backend nccl), per GPU 1B 8x1024 or 8B 4x2048, with mlx's all-reduce after the
# backward pass (tuning_fork) and with 8 MB buckets reduced on a stream of their own beside it (streamed8).
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
run 1 tuning_fork
run 2 tuning_fork
run 4 tuning_fork
[ "${2:-}" = quick ] || run 4 streamed8
