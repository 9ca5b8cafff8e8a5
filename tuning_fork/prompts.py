"""Prompt formats: conversations rendered as each model family's official chat template renders them.

`render(fmt, messages, add_generation_prompt)` is used for training records and for generation alike, so a
model is prompted at generation time exactly as it was trained. `prompt.format=tokenizer` bypasses this
module and uses the model's own template.
"""

from __future__ import annotations

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")


def _split_system(messages):
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return None, list(messages)


def chatml(messages, add_generation_prompt):
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def llama3(messages, add_generation_prompt):
    out = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages)
    return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


def mistral(messages, add_generation_prompt):
    """Mistral-7B-Instruct-v0.3: the system text opens the last user turn; no generation header."""
    system, rest = _split_system(messages)
    last_user = max((i for i, m in enumerate(rest) if m["role"] == "user"), default=-1)
    out = "<s>"
    for i, m in enumerate(rest):
        if m["role"] == "user":
            text = f"{system}\n\n{m['content']}" if system and i == last_user else m["content"]
            out += f"[INST] {text}[/INST]"
        elif m["role"] == "assistant":
            out += f" {m['content'].strip()}</s>"
    return out


def alpaca(messages, add_generation_prompt):
    system, rest = _split_system(messages)
    out = (system or ALPACA_PREAMBLE) + "\n\n"
    for m in rest:
        if m["role"] == "user":
            out += f"### Instruction:\n{m['content']}\n\n### Response:\n"
        elif m["role"] == "assistant":
            out += f"{m['content']}\n\n"
    return out


def phi(messages, add_generation_prompt):
    """Phi-3 / Phi-3.5: role tags closed by <|end|>; without a generation header the text ends with EOS."""
    out = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages
                  if m["role"] != "system" or m["content"])
    return out + ("<|assistant|>\n" if add_generation_prompt else "<|endoftext|>")


def gemma(messages, add_generation_prompt):
    """Gemma: user and model turns only; the system text opens the first user turn (as Gemma 3 does)."""
    system, rest = _split_system(messages)
    out = "<bos>"
    for i, m in enumerate(rest):
        role = "model" if m["role"] == "assistant" else m["role"]
        text = m["content"].strip()
        if i == 0 and system:
            text = f"{system.strip()}\n\n{text}"
        out += f"<start_of_turn>{role}\n{text}<end_of_turn>\n"
    return out + ("<start_of_turn>model\n" if add_generation_prompt else "")


FORMATS = {"chatml": chatml, "llama3": llama3, "mistral": mistral, "alpaca": alpaca, "phi": phi, "gemma": gemma}


def render(fmt: str, messages, add_generation_prompt: bool = True) -> str:
    return FORMATS[fmt](messages, add_generation_prompt)
