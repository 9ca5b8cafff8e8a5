#!/usr/bin/env bash
# Issue 18 on one H200: tuning_fork's step (lean layers, checkpointing, chunked loss) against Unsloth's, and GRPO
# against TRL's and Unsloth's GRPOTrainer, each part in one call so that ours and the peers share the machine.
# After staging MLX (../shared/device/README.md: .device/p1, .device/p2 unpacked to /tmp/tf-site) and the peers
# (../shared/device/stage_peers.sh: .device/b, .device/u installed to /tmp/peer-site), from the project's root:
#   bash benchmarks/lean_suite.sh {1b|8b|grpo} OUT
# Every measurement is its own process and prints a RESULT line (collected in OUT/log.txt).
set -u
part=$1 out=${2:-/tmp/lean}
root=$PWD
mkdir -p "$out"
ours() { echo "== ours $*" | tee -a "$out/log.txt"
         (export PYTHONPATH=/tmp/tf-site:$root PYTHONUNBUFFERED=1; timeout 200 python3 "$@" 2>&1 | tail -3 | tee -a "$out/log.txt"); }
peer() { echo "== peer $*" | tee -a "$out/log.txt"
         (cd /tmp && export PYTHONPATH=/tmp/peer-site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 \
            HF_HUB_ENABLE_HF_TRANSFER=0 UNSLOTH_COMPILE_LOCATION=/tmp/uns-cache PYTHONUNBUFFERED=1 &&
          timeout 300 python3 "$@" 2>&1 | tail -3 | tee -a "$out/log.txt"); }
if [ "$part" = 1b ]; then
  ours benchmarks/gpu_step.py tuning_fork 1b 8 1024
  peer "$root/.device/u/peers.py" unsloth 1b 8 1024
  ours benchmarks/gpu_step.py tuning_fork+noaddmm 1b 8 1024
  ours benchmarks/gpu_step.py tuning_fork+ckptattn 1b 8 1024
  ours benchmarks/gpu_step.py tuning_fork+ckptmlp 1b 8 1024
  ours benchmarks/gpu_step.py chunked256 1b 8 1024
  ours benchmarks/gpu_step.py chunked256+ckptmlp 1b 8 1024
  ours benchmarks/gpu_step.py mlx_lm 1b 8 1024
elif [ "$part" = 8b ]; then
  ours benchmarks/gpu_step.py tuning_fork 8b 4 2048
  peer "$root/.device/u/peers.py" unsloth 8b 4 2048
  ours benchmarks/gpu_step.py mlx_lm 8b 4 2048
  ours benchmarks/gpu_step.py tuning_fork+ckptmlp 8b 4 2048
  ours benchmarks/gpu_step.py chunked256+ckptattn 8b 4 2048
elif [ "$part" = grpo ]; then
  ours benchmarks/grpo_step.py 1b 8 8 128 256
  peer "$root/benchmarks/grpo_trl.py" 8 8 128 256 generate
  ours benchmarks/grpo_step.py 1b 8 8 128 256 checkpoint
  peer "$root/benchmarks/grpo_trl.py" 8 8 128 256 unsloth
fi
