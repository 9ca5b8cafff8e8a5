#!/usr/bin/env bash
# Issue 23: do bucketed all-reduces overlap the backward pass when they run on a stream of their own?
# Two GPUs, 1B 8x1024 per GPU (after ../shared/device/stage.sh and its first call).
set -u
[ -d /tmp/tf-site/mlx ] || bash .device/p2/unpack.sh || exit 3
export PYTHONPATH=/tmp/tf-site:$PWD PYTHONUNBUFFERED=1
step2() { timeout 200 python3 -c "import sys; from mlx._distributed_utils.launch import main; sys.argv=['mlx.launch','-n','2','--backend','nccl','--','python3','benchmarks/gpu_step.py']+sys.argv[1:]; sys.exit(main())" "$@" 2>&1 | grep -E "RESULT|Error" | tail -2 || echo "FAILED $*"; }
for v in tuning_fork streamed8 streamed4 bucketed8; do step2 $v 1b 8 1024; done
