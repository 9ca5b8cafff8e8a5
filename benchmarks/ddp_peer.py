"""The several-GPU peer for issue 23: PyTorch + PEFT LoRA under DistributedDataParallel, the same work as
benchmarks/gpu_step.py (a random bf16 Llama-like model, rank 16 / alpha 32 on every linear of every block,
random tokens, AdamW), per GPU BATCH x SEQ. Run under torchrun; prints one RESULT {json} line (rank 0, global
tokens/s, rank 0's peak memory).

    torchrun --nproc_per_node N benchmarks/ddp_peer.py {eager|compile} {1b|8b} BATCH SEQ
"""

import json
import os
import sys
import time

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, head_dim=64, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, head_dim=128, tie_word_embeddings=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP = 3


def main():
    if len(sys.argv) != 5 or sys.argv[1] not in ("eager", "compile") or sys.argv[2] not in SHAPES:
        sys.exit("usage: torchrun --nproc_per_node N benchmarks/ddp_peer.py {eager|compile} {1b|8b} BATCH SEQ")
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel
    from transformers import LlamaConfig, LlamaForCausalLM

    which, shape, B, T = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    dist.init_process_group("nccl")
    rank, local = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    cfg = LlamaConfig(rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192, **SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = DistributedDataParallel(get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                                     target_modules=TARGETS)), device_ids=[local])
    run = torch.compile(model) if which == "compile" else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    torch.manual_seed(rank)
    x = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")

    def step():
        loss = run(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    steps = int(os.environ.get("BENCH_STEPS", 10))
    dist.barrier()
    tic = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - tic) / steps
    n = dist.get_world_size()
    if rank == 0:
        print("RESULT " + json.dumps(dict(which=f"ddp_{which}", shape=shape, batch=B, seq=T, ranks=n, step_s=dt,
                                          tok_s=n * B * T / dt, peak_gb=torch.cuda.max_memory_allocated() / 1e9,
                                          loss=loss.item())), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
