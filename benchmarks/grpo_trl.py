"""The peer of benchmarks/grpo_step.py: TRL's GRPOTrainer (PyTorch + PEFT LoRA rank 16, alpha 32, every linear)
on the same work: a random Llama-1B-like bf16 model, PROMPTS random prompts of PROMPT tokens a step, GROUP
completions of up to COMPLETION tokens each (temperature 1, top_p 1), a length reward, beta 0.04, loss_type grpo,
one optimizer step per batch, AdamW. For the device machine (torch, transformers, peft there; trl 1.15 and
datasets staged as ../shared/device/README.md says).

    python benchmarks/grpo_trl.py PROMPTS GROUP PROMPT COMPLETION [generate|continuous|unsloth] [checkpoint]
`generate` samples with transformers' generate (TRL's default without vLLM); `continuous` with transformers'
continuous batching (use_transformers_continuous_batching); `unsloth`: Unsloth's model and LoRA (its patched
GRPOTrainer, sampling without vLLM), from a local folder, as ../shared/device/peers.py loads it (run from /tmp
with UNSLOTH_COMPILE_LOCATION set). `checkpoint`: gradient checkpointing on (Unsloth's own, for unsloth).
Prints one `RESULT {json}` line.
"""

import json
import random
import sys
import time

MODE = sys.argv[5] if len(sys.argv) > 5 else "generate"
CHECKPOINT = "checkpoint" in sys.argv[6:]
if MODE == "unsloth":
    import unsloth  # noqa: F401  (first: it patches transformers, peft and trl on import)
import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

B, G, P, C = (int(x) for x in sys.argv[1:5])
V = 128256
cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=V, head_dim=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
                  rope_theta=500000.0, max_position_embeddings=8192)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t3")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
if MODE == "unsloth":
    import tempfile

    from unsloth import FastLanguageModel

    folder = tempfile.mkdtemp(dir="/tmp")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    model, tok = FastLanguageModel.from_pretrained(folder, max_seq_length=P + C + 8, dtype=torch.bfloat16,
                                                   load_in_4bit=False, fast_inference=False, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, target_modules=TARGETS,
                                             bias="none", use_gradient_checkpointing="unsloth" if CHECKPOINT else False)
    peft_config = None
rng = random.Random(0)
ds = Dataset.from_list([{"prompt": " ".join(f"t{rng.randrange(4, 30000)}" for _ in range(P))} for _ in range(B * 16)])


def length(prompts, completions, **kwargs):
    return [max(0.0, 1 - abs(len(c) - 100) / 100) for c in completions]


kw = dict(output_dir="/tmp/grpo", per_device_train_batch_size=B * G, num_generations=G, max_completion_length=C,
          temperature=1.0, top_p=1.0, beta=0.04, loss_type="grpo", num_iterations=1, epsilon=0.2, max_steps=8,
          learning_rate=1e-5, bf16=True, logging_steps=1, report_to="none",
          gradient_checkpointing=CHECKPOINT and MODE != "unsloth",
          save_strategy="no", dataloader_num_workers=0, seed=0, use_vllm=False,
          use_transformers_continuous_batching=MODE == "continuous")
kw = {k: v for k, v in kw.items() if k in GRPOConfig.__dataclass_fields__}
times, lengths = [], []


class T(TrainerCallback):
    def on_step_end(self, args, state, control, **k):
        torch.cuda.synchronize()
        times.append(time.perf_counter())
        if len(times) == 3:
            torch.cuda.reset_peak_memory_stats()

    def on_log(self, args, state, control, logs=None, **k):
        if logs and "completions/mean_length" in logs:
            lengths.append(logs["completions/mean_length"])


trainer = GRPOTrainer(model=model, reward_funcs=[length], args=GRPOConfig(**kw), train_dataset=ds,
                      processing_class=tok, callbacks=[T()], peft_config=peft_config)
trainer.train()
dt = (times[-1] - times[2]) / (len(times) - 3)
print("RESULT " + json.dumps(dict(which=f"trl_grpo_{MODE}", checkpoint=CHECKPOINT, prompts=B, group=G, prompt=P, completion=C, step_s=dt,
                                  completions_s=B * G / dt, completion_length=lengths[-1] if lengths else None,
                                  peak_gb=torch.cuda.max_memory_allocated() / 1e9)), flush=True)
