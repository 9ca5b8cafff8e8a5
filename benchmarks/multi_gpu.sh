#!/usr/bin/env bash
# Issue 23's figures in one call on `nvidia-h200-x2` (after ../shared/device/stage.sh and its first call):
# the step on 1 and 2 GPUs at 1B 8x1024 and 8B 4x2048 per GPU, our last-layer-first bucketed reduction
# (tuning_fork) against mlx's average_gradients (plainreduce); issue 18's breakdown of the step (weights
# loaded from disk, fresh batches); the CLI end to end on 1 and 2 GPUs. Logs under $OUT.
#   bash benchmarks/multi_gpu.sh 1b     then, in the next call,     bash benchmarks/multi_gpu.sh 8b
#   bash benchmarks/multi_gpu.sh quick  the step alone on 1 and 2 GPUs at 1B and 8B (one call)
#   bash benchmarks/multi_gpu.sh flat   the step on 1 GPU, then on 2 with and without step.flat_update, 1B and 8B
#   bash benchmarks/multi_gpu.sh peer   1B on 1 and 2 GPUs: ours, then PyTorch + PEFT under DDP (eager, compiled)
#   bash benchmarks/multi_gpu.sh final  flat, then 2 ranks without the all-reduce, then the CLI on 1 and 2 GPUs
#   bash benchmarks/multi_gpu.sh tail1b (tail8b) what the updates' place after the all-reduce costs (session 9)
#   bash benchmarks/multi_gpu.sh cli    the CLI end to end on 1 and 2 GPUs (writes the model first)
#   bash benchmarks/multi_gpu.sh apart  the same, and two independent one-GPU processes timed together (no
#                                       all-reduce): what two GPUs on one host give without communicating
set -u
part=${1:-1b}
case "$part" in 1b|8b|quick|apart|flat|final|tail1b|tail8b|cli|model|peer) ;;
  *) echo "multi_gpu.sh: unknown part '$part': use 1b, 8b, quick, apart, flat, final, tail1b, tail8b, cli, model or peer" >&2; exit 2;;
esac
[ -d /tmp/tf-site/mlx ] || bash .device/p2/unpack.sh || exit 3
# the package as a wheel lays it out (conf/ ships as tuning_fork.conf), without pip: this checkout is a copy
[ -e tuning_fork/conf ] || cp -r conf tuning_fork/conf
export PYTHONPATH=/tmp/tf-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
launch() { python3 -c "import sys; from mlx._distributed_utils.launch import main; sys.argv=['mlx.launch']+sys.argv[1:]; sys.exit(main())" -n 2 --backend nccl -- "$@"; }
step() { timeout 240 python3 benchmarks/gpu_step.py "$@" 2>&1 | grep RESULT || echo "FAILED step $*"; }
step2() { timeout 300 python3 -c "import sys; from mlx._distributed_utils.launch import main; sys.argv=['mlx.launch','-n','2','--backend','nccl','--','python3','benchmarks/gpu_step.py']+sys.argv[1:]; sys.exit(main())" "$@" 2>&1 | grep RESULT || echo "FAILED step2 $*"; }

make_model() {  # a random Llama-3.2-1B-like model in Transformers' format, and 800 uniform records
[ -e /tmp/m1b/config.json ] && return
CUDA_VISIBLE_DEVICES=0 python3 - <<'PY'
import json, os, random, torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers
V = 128256
cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                  vocab_size=V, head_dim=64, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192)
torch.manual_seed(0)
with torch.device("cuda"):
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained("/tmp/m1b")
tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t3").save_pretrained("/tmp/m1b")
rnd = random.Random(0)
os.makedirs("/tmp/uni", exist_ok=True)
for split, n in (("train", 800), ("valid", 16)):
    with open(f"/tmp/uni/{split}.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(f"t{rnd.randrange(4, 30000)}" for _ in range(1500))}) + "\n")
PY
}
cli() {
echo "== the CLI, uniform 8x1024 batches, one epoch of 800 records: one GPU, two GPUs"
for n in 1 2; do
  SECONDS=0
  args="model.path=/tmp/m1b schedule=default adapter.rank=16 adapter.alpha=32 data=jsonl data.path=/tmp/uni schedule.batch_size=$((8 * n)) schedule.epochs=1 data.max_seq_length=1024 schedule.val_batches=2 hydra.run.dir=/tmp/r$n"
  if [ $n = 1 ]; then CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m tuning_fork $args > "$OUT/cli$n.log" 2>&1
  else timeout 300 python3 -c "import sys; from mlx._distributed_utils.launch import main; sys.argv=['mlx.launch','-n','2','--backend','nccl','--','python3','-m','tuning_fork']+sys.argv[1:]; sys.exit(main())" $args > "$OUT/cli$n.log" 2>&1; fi
  echo "cli n=$n rc=$? wall=${SECONDS}s"
  python3 -c "
import json, statistics as st
r = [json.loads(l) for l in open('/tmp/r$n/metrics.jsonl')]
t = [x for x in r if 'train_loss' in x]
tps = [x['tokens_per_second'] for x in t[3:]]
print('cli n=$n', 'reports', len(t), 'median tok/s', round(st.median(tps)), 'tokens', t[-1]['trained_tokens'], 'peak', t[-1].get('peak_memory'))" 2>&1 | tail -1
  cp /tmp/r$n/metrics.jsonl "$OUT/cli${n}_metrics.jsonl" 2>/dev/null
done
}
if [ "$part" = quick ]; then  # the step alone, 1 and 2 GPUs, 1B then 8B (no model to write, no CLI)
  for shape in "1b 8 1024" "8b 4 2048"; do
    CUDA_VISIBLE_DEVICES=0 step tuning_fork $shape
    step2 tuning_fork $shape
  done
  exit 0
fi
if [ "$part" = peer ]; then  # issue 23 against PyTorch + PEFT under DDP (benchmarks/ddp_peer.py), 1B, one call
  export BENCH_STEPS=20
  CUDA_VISIBLE_DEVICES=0 step tuning_fork 1b 8 1024
  step2 tuning_fork 1b 8 1024
  for run in "eager 1" "eager 2" "compile 2" "compile 1"; do
    set -- $run
    PYTHONPATH= timeout 200 torchrun --standalone --nproc_per_node $2 benchmarks/ddp_peer.py $1 1b 8 1024 2>&1 | grep RESULT || echo "FAILED ddp $run"
  done
  exit 0
fi
if [ "$part" = flat ] || [ "$part" = final ]; then  # issue 23: step.flat_update (default with several ranks) and not
  export BENCH_STEPS=30
  for shape in "1b 8 1024" "8b 4 2048"; do
    CUDA_VISIBLE_DEVICES=0 step tuning_fork $shape
    step2 tuning_fork $shape
    step2 tuning_fork+noflat $shape
  done
  [ "$part" = flat ] && exit 0
  BENCH_NOREDUCE=1 step2 tuning_fork 1b 8 1024
  make_model
  cli
  exit 0
fi
if [ "$part" = tail1b ] || [ "$part" = tail8b ]; then  # issue 23: what the all-reduce's place in the step costs
  export BENCH_STEPS=30 BENCH_ALLRANKS=1
  shape="1b 8 1024"; [ "$part" = tail8b ] && shape="8b 4 2048"
  if [ "$part" = tail1b ]; then
    CUDA_VISIBLE_DEVICES=0 step tuning_fork $shape
    CUDA_VISIBLE_DEVICES=0 BENCH_NOREDUCE=ordered step tuning_fork $shape
    CUDA_VISIBLE_DEVICES=0 BENCH_NOREDUCE=concat step tuning_fork $shape
  fi
  CUDA_VISIBLE_DEVICES=0 step tuning_fork+flat $shape
  step2 tuning_fork+noflat $shape  # average_gradients and the per-parameter update
  step2 tuning_fork+flat $shape
  [ "$part" = tail1b ] && BENCH_NOREDUCE=1 step2 tuning_fork $shape
  [ "$part" = tail8b ] && CUDA_VISIBLE_DEVICES=0 step tuning_fork $shape
  exit 0
fi
if [ "$part" = apart ]; then
  for shape in "1b 8 1024" "8b 4 2048"; do
    export BENCH_STEPS=30
    CUDA_VISIBLE_DEVICES=0 step tuning_fork $shape
    rm -f /tmp/bar.*
    CUDA_VISIBLE_DEVICES=0 BENCH_BARRIER=/tmp/bar:2 step tuning_fork $shape > "$OUT/apart0.txt" &
    CUDA_VISIBLE_DEVICES=1 BENCH_BARRIER=/tmp/bar:2 step tuning_fork $shape > "$OUT/apart1.txt"
    wait
    echo "apart, GPU 0: $(cat "$OUT/apart0.txt")"
    echo "apart, GPU 1: $(cat "$OUT/apart1.txt")"
    step2 tuning_fork $shape
  done
  exit 0
fi
make_model
if [ "$part" = model ]; then exit 0; fi
if [ "$part" = cli ]; then cli; exit 0; fi
if [ "$part" = 8b ]; then
  cli
  echo "== 8B 4x2048: one GPU, two GPUs (plain, bucketed 8 MB)"
  CUDA_VISIBLE_DEVICES=0 step tuning_fork 8b 4 2048
  step2 tuning_fork 8b 4 2048
  step2 bucketed8 8b 4 2048
  exit 0
fi
echo "== 1B 8x1024: one GPU (built, loaded, loaded+fresh batches), two GPUs (ours, plain)"
CUDA_VISIBLE_DEVICES=0 step tuning_fork 1b 8 1024
CUDA_VISIBLE_DEVICES=0 BENCH_MODEL=/tmp/m1b step tuning_fork 1b 8 1024
CUDA_VISIBLE_DEVICES=0 BENCH_MODEL=/tmp/m1b BENCH_FRESH=1 step tuning_fork 1b 8 1024
step2 tuning_fork 1b 8 1024
step2 bucketed8 1b 8 1024
cli
