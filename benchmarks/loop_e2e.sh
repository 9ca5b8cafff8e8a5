#!/usr/bin/env bash
# Issue 18: the CLI's training tokens/s against its step benchmark, on one GPU: uniform 8x1024 batches
# (60 iterations) and uneven records (800 of 200-1000 tokens, one epoch, batch 8), whole-process time too.
# After benchmarks/multi_gpu.sh (or its `model` part) in this session.
set -u
bash benchmarks/multi_gpu.sh model || exit 3
export PYTHONPATH=/tmp/tf-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=0
[ -e /tmp/var/train.jsonl ] || python3 - <<'PY'
import json, os, random
rnd = random.Random(0)
os.makedirs("/tmp/var", exist_ok=True)
for split, n in (("train", 800), ("valid", 16)):
    with open(f"/tmp/var/{split}.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(f"t{rnd.randrange(4, 30000)}" for _ in range(rnd.randint(200, 1000)))}) + "\n")
PY
python3 benchmarks/gpu_step.py tuning_fork 1b 8 1024 2>&1 | grep RESULT
base="model.path=/tmp/m1b schedule=default adapter.rank=16 adapter.alpha=32 data=jsonl schedule.batch_size=8 data.max_seq_length=1024 schedule.val_batches=2"
for case in "uni schedule.epochs=null schedule.iters=60 schedule.steps_per_report=10" "var schedule.epochs=1"; do
  set -- $case; name=$1; shift
  SECONDS=0
  python3 -m tuning_fork $base data.path=/tmp/$name "$@" hydra.run.dir=/tmp/e-$name > /tmp/e-$name.log 2>&1
  wall=$SECONDS
  python3 -c "
import json, statistics as st
t = [json.loads(l) for l in open('/tmp/e-$name/metrics.jsonl')]
t = [x for x in t if 'train_loss' in x]
tps = [x['tokens_per_second'] for x in t[1:]]
tot = sum(x.get('train_seconds', 0) for x in t)
print('$name', 'median tok/s', round(st.median(tps)), 'reports', len(t), 'trained tokens', t[-1]['trained_tokens'], 'whole process $wall s')"
done
