"""Prompt formats: conversations rendered as each model family's official chat template renders them.

`render(fmt, messages, add_generation_prompt)` is used for training records and for generation alike, so a
model is prompted at generation time exactly as it was trained. `prompt.format=tokenizer` bypasses this
module and uses the model's own template.
"""

from __future__ import annotations

import re

from .errors import TuningForkError


class PromptError(TuningForkError):
    pass

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

# The same formats as Jinja chat templates, for what renders through a tokenizer (mlx_lm.server's
# --chat-template, an exported model's chat_template.jinja). tests/test_serve.py checks that the tokenizer's
# rendering equals render()'s for each.
_SYSTEM = ("{% if messages and messages[0].role == 'system' %}{% set system = messages[0].content %}"
           "{% set rest = messages[1:] %}{% else %}{% set system = none %}{% set rest = messages %}{% endif %}")
JINJA = {
    "chatml": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "llama3": "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
              "{{ m.content | trim }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "mistral": _SYSTEM + "{% set ns = namespace(last=-1) %}{% for m in rest %}{% if m.role == 'user' %}"
               "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}<s>{% for m in rest %}{% if m.role == 'user' %}"
               "[INST] {% if system and loop.index0 == ns.last %}{{ system }}\n\n{% endif %}{{ m.content }}[/INST]"
               "{% elif m.role == 'assistant' %} {{ m.content | trim }}</s>{% endif %}{% endfor %}",
    "alpaca": _SYSTEM + "{{ system or '" + ALPACA_PREAMBLE + "' }}\n\n{% for m in rest %}{% if m.role == 'user' %}"
              "### Instruction:\n{{ m.content }}\n\n### Response:\n{% elif m.role == 'assistant' %}"
              "{{ m.content }}\n\n{% endif %}{% endfor %}",
    "phi": "{% for m in messages %}{% if m.role != 'system' or m.content %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n"
           "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% else %}<|endoftext|>{% endif %}",
    "gemma": _SYSTEM + "<bos>{% for m in rest %}{% if loop.first and system %}<start_of_turn>"
             "{{ 'model' if m.role == 'assistant' else m.role }}\n{{ system | trim }}\n\n{{ m.content | trim }}"
             "<end_of_turn>\n{% else %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
             "{{ m.content | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
}


def render(fmt: str, messages, add_generation_prompt: bool = True) -> str:
    return FORMATS[fmt](messages, add_generation_prompt)


# -------------------------------------------------------------------------------------------- Word Loom

DEFAULT_SECTIONS = ("system_prompt", "context", "question")
_MARKER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PAIR = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=\[(.*?)\](?=\s+[A-Za-z_][A-Za-z0-9_]*=\[|\s*$)", re.S)


def parse_markers(markers) -> dict:
    """Marker values from mlx-tuning-fork's string form `name=[value] other=[value two]` or a mapping.

    Values may hold spaces, `=` and brackets; a value ends at `]` followed by the next `name=[` or the end."""
    if markers is None:
        return {}
    if not isinstance(markers, str):
        return {str(k): str(v) for k, v in dict(markers).items()}
    text = markers.strip()
    pairs, pos = {}, 0
    for m in _PAIR.finditer(text):
        if text[pos:m.start()].strip():
            break
        pairs[m.group(1)] = m.group(2)
        pos = m.end()
    if text[pos:].strip() or (text and not pairs):
        raise PromptError(f"prompt.loom_markers={markers!r}: write them as name=[value] other=[value two]")
    return pairs


def fill(text: str, values: dict, where: str) -> str:
    missing = sorted({m for m in _MARKER.findall(text) if m not in values})
    if missing:
        raise PromptError(f"{where}: no value for marker(s) {', '.join('{' + m + '}' for m in missing)}: "
                          f"pass prompt.loom_markers='{missing[0]}=[...]'")
    return _MARKER.sub(lambda m: values[m.group(1)], text)


def loom_texts(prompt) -> tuple[str | None, str | None, str]:
    """(system, context, user) texts built from the loom file's sections, markers filled."""
    from pathlib import Path

    from ogbujipt import word_loom

    path = Path(prompt.loom_file).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PromptError(f"prompt.loom_file={prompt.loom_file}: cannot read it ({e.strerror})") from None
    try:
        import tomli

        tables = tomli.loads(raw.decode("utf-8"))
        lang = tables.get("lang", "en")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 'text' key is deprecated in favour of '_'; both work
            loom = word_loom.load(raw, lang=lang)
    except Exception as e:
        raise PromptError(f"{path}: not a Word Loom TOML file ({type(e).__name__}: {e})") from None

    names = prompt.build_prompt
    if names is None:
        names = [n for n in DEFAULT_SECTIONS if n in loom or n == "question"]
    elif isinstance(names, str):
        names = names.split()
    else:
        names = list(names)
    if not 1 <= len(names) <= 3:
        raise PromptError(f"prompt.build_prompt={names}: name 1 to 3 sections (user; system user; "
                          "system context user)")
    values = parse_markers(prompt.loom_markers)

    def section(name: str) -> str:
        if name.startswith("[") and name.endswith("]"):
            target = (path.parent / name[1:-1]).resolve()
            if not prompt.allow_outside_files and not target.is_relative_to(path.parent.resolve()):
                raise PromptError(f"prompt.build_prompt: {name} is outside the loom file's folder "
                                  f"{path.parent}: set prompt.allow_outside_files=true to allow it")
            try:
                text = target.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise PromptError(f"prompt.build_prompt: {name}: cannot read {target} ({e})") from None
        elif name in loom:
            text = str(loom[name])
        else:
            have = sorted(k for k, v in tables.items() if isinstance(v, dict))
            raise PromptError(f"{path}: no section [{name}] (sections: {', '.join(have[:12])}): fix "
                              "prompt.build_prompt")
        return fill(text, values, f"{path} [{name}]")

    texts = [section(n) for n in names]
    if len(texts) == 1:
        return None, None, texts[0]
    if len(texts) == 2:
        return texts[0], None, texts[1]
    return texts[0], texts[1], texts[2]


def build_messages(prompt, few_shot=None) -> list[dict]:
    """The conversation to prompt with: system (with any loom context), few-shot turns, the user turn."""
    system, context, user = prompt.system, None, prompt.text
    if prompt.loom_file:
        loom_system, context, loom_user = loom_texts(prompt)
        system = loom_system if loom_system is not None else system
        user = loom_user if prompt.text is None else prompt.text
    if user is None:
        raise PromptError("no prompt: set prompt.text=... (or prompt.loom_file=... with a question section)")
    system_text = "\n\n".join(t.strip() for t in (system, context) if t and t.strip()) or None
    messages = [{"role": "system", "content": system_text}] if system_text else []
    messages += list(few_shot or [])
    messages.append({"role": "user", "content": user.strip()})
    return messages
