#!/usr/bin/env bash
# The H200 measurements in BENCHMARKS.md, run on the device machine after staging MLX there
# (../shared/device/README.md). Every measurement is its own process; results are RESULT lines.
#   bash benchmarks/gpu_suite.sh single  OUT [PEER]   one GPU: mlx-lm's step, ours, ours chunked (+ PyTorch+PEFT
#                                                     through the reference script PEER) at 1B 8x1024, 8B 4x2048
#   bash benchmarks/gpu_suite.sh scaling OUT          1B 8x1024 per GPU on 1 GPU, then 2 GPUs (mlx.launch, NCCL)
#   bash benchmarks/gpu_suite.sh launches OUT         one GPU: mlx-lm's step, ours under MLX's CUDA graphs, ours
#                                                     as train.py runs it (direct launches, paced), 1B and 8B
set -u
mode=$1 out=${2:-/tmp/gpu} peer=${3:-}
mkdir -p "$out"
run() { echo "== $*" | tee -a "$out/log.txt"; timeout 170 "$@" 2>&1 | tail -4 | tee -a "$out/log.txt"; }
launch() { python3 -c "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; main()" "$@"; }
if [ "$mode" = single ]; then
  export CUDA_VISIBLE_DEVICES=0
  for v in mlx_lm tuning_fork chunked1024 chunked256 chunked128; do run python3 benchmarks/gpu_step.py $v 1b 8 1024; done
  [ -n "$peer" ] && run python3 "$peer" torch 1b 8 1024
  for v in mlx_lm tuning_fork chunked1024 chunked256; do run python3 benchmarks/gpu_step.py $v 8b 4 2048; done
  [ -n "$peer" ] && run python3 "$peer" torch 8b 4 2048
elif [ "$mode" = scaling ]; then
  CUDA_VISIBLE_DEVICES=0 run python3 benchmarks/gpu_step.py tuning_fork 1b 8 1024
  run launch -n 2 --backend nccl -- python3 benchmarks/gpu_step.py tuning_fork 1b 8 1024
  for v in tuning_fork mlx_lm; do CUDA_VISIBLE_DEVICES=0 run python3 benchmarks/gpu_step.py $v 1b 8 1024; done
  for v in tuning_fork mlx_lm; do CUDA_VISIBLE_DEVICES=0 run python3 benchmarks/gpu_step.py $v 1b 16 1024; done
  CUDA_VISIBLE_DEVICES=0 run python3 benchmarks/gpu_step.py tuning_fork 1b_v32k 8 1024
elif [ "$mode" = launches ]; then
  export CUDA_VISIBLE_DEVICES=0
  for shape in "1b 8 1024" "1b 16 1024" "8b 4 2048"; do
    for v in mlx_lm graphs tuning_fork; do run python3 benchmarks/gpu_step.py $v $shape; done
  done
fi
