"""`python -m tuning_fork.generate`: generate from a model plus adapters, as a Hydra app.

    python -m tuning_fork.generate run=outputs/2026-11-28/10-00-00 "prompt.text=What is the frequency of A4?"
    python -m tuning_fork.generate model=mistral prompt=mistral "prompt.system=..." "prompt.text=..." prompt_only=true

Reads top to bottom: choose the model and adapters, build the prompt string, then stream tokens.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .cli import run_app
from .config import register
from .errors import ConfigError

register()

# colour by probability: (lower bound, ANSI colour, label)
COLOURS = [(0.8, "\033[32m", "> 0.8"), (0.6, "\033[36m", "> 0.6"), (0.4, "\033[33m", "> 0.4"),
           (0.2, "\033[35m", "> 0.2"), (0.0, "\033[31m", "≤ 0.2")]
RESET = "\033[0m"


def generate(cfg) -> str:
    base, adapters, adapter_config, fmt = choose_model(cfg)
    few_shot = read_few_shot(cfg.cot_source) if cfg.cot_source else None
    from .prompts import build_messages, render

    messages = build_messages(cfg.prompt, few_shot)

    if fmt == "tokenizer":
        from .models import load_tokenizer

        tokenizer = load_tokenizer(base, trusted(cfg))
        from .models import require_chat_template

        require_chat_template(tokenizer, base)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        tokenizer = None
        prompt = render(fmt, messages, add_generation_prompt=True)
    if cfg.prompt_only:
        sys.stdout.write(prompt + "\n")
        return prompt

    model, tokenizer = load_model(cfg, base, adapters, adapter_config)
    return stream(cfg, model, tokenizer, prompt)


def trusted(cfg) -> bool:
    return bool(cfg.trust_remote_code or cfg.model.trust_remote_code)


def choose_model(cfg):
    """(base model, adapter folder or None, its adapter_config, prompt format), from run= or model= ."""
    from . import models

    fmt, adapters = cfg.prompt.format, cfg.adapter_path
    if cfg.run:
        run = Path(cfg.run).expanduser()
        if not (run / "adapters" / "adapter_config.json").exists():
            raise ConfigError(f"run={cfg.run}: no adapters/adapter_config.json there: point run= at a finished "
                              "training run's folder")
        adapters = str(run / "adapters")
        if cfg.checkpoint not in ("best", "last"):
            raise ConfigError(f"checkpoint={cfg.checkpoint!r} is invalid: choose best or last")
        if cfg.checkpoint == "best" and (run / "adapters" / "best" / "adapters.safetensors").exists():
            adapters = str(run / "adapters" / "best")
        saved = run / ".hydra" / "config.yaml"
        if fmt == "tokenizer" and saved.exists():  # prompt the model as it was trained
            fmt = OmegaConf.load(saved).get("prompt", {}).get("format", fmt)
    adapter_config = {}
    if adapters:
        path = Path(adapters).expanduser() / "adapter_config.json"
        if not path.exists():
            raise ConfigError(f"adapter_path={adapters}: no adapter_config.json there")
        adapter_config = json.loads(path.read_text())
    base = adapter_config.get("model") if cfg.run else None
    base = base or models.resolve(cfg.model.path)
    return base, adapters, adapter_config, fmt


def load_model(cfg, base, adapters, adapter_config):
    import mlx.nn as nn

    from . import models

    models.import_tuner()
    from mlx_lm.tuner.utils import load_adapters

    model_cfg = OmegaConf.merge(cfg.model, {"path": base, "trust_remote_code": trusted(cfg)})
    model, tokenizer = models.load(model_cfg)
    if adapters:
        q = adapter_config.get("quantization")
        if q and not models.is_quantized(model):  # QLoRA: the base as it was during training
            nn.quantize(model, group_size=q["group_size"], bits=q["bits"])
        try:
            load_adapters(model, adapters)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"adapter_path={adapters}: do not fit {base}: {str(e).splitlines()[0]}") from None
        model.eval()
    if cfg.eos_token:
        tokenizer.add_eos_token(cfg.eos_token)
    return model, tokenizer


def stream(cfg, model, tokenizer, prompt: str) -> str:
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    if cfg.num_tokens < 1:
        raise ConfigError(f"num_tokens={cfg.num_tokens}: generate at least 1 token")
    mx.random.seed(cfg.seed)
    sampler = make_sampler(cfg.temperature, top_p=cfg.top_p if cfg.top_p < 1 else 0.0, min_p=cfg.min_p,
                           min_tokens_to_keep=cfg.min_p_tokens)
    processors = make_logits_processors(repetition_penalty=cfg.repetition_penalty,
                                        repetition_context_size=cfg.repetition_context_size)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    mx.reset_peak_memory()
    colour = Colourizer(tokenizer) if cfg.colorize else None
    text, last = "", None
    for response in stream_generate(model, tokenizer, ids, max_tokens=cfg.num_tokens, sampler=sampler,
                                    logits_processors=processors):
        last = response
        if response.finish_reason == "stop":
            break
        if colour is None:
            piece = response.text
        else:
            piece = colour.add(response.token, math.exp(response.logprobs[response.token].item()))
        text += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
    if colour is None and last is not None and last.finish_reason == "stop" and last.text:
        text += last.text  # the detokenizer's flush of held-back text
        sys.stdout.write(last.text)
    if colour is not None:
        tail = colour.flush()
        text += tail
        sys.stdout.write(tail)
        sys.stdout.write("\n" + colour.legend())
    sys.stdout.write("\n")
    if last is not None:
        sys.stderr.write(f"{last.generation_tokens} tokens · {last.generation_tps:.1f} tokens/s · "
                         f"prompt {last.prompt_tps:.1f} tokens/s · peak memory {last.peak_memory:.3f} GB\n")
    return text


class Colourizer:
    """Each token's own text, coloured by its probability.

    mlx-lm's streaming detokenizer lags a token, so colours would land on the neighbour's text; instead the
    token ids decode cumulatively, and a token whose bytes end mid-character waits for the next one (the pair
    takes the lower probability)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.shown, self.pending = tokenizer, [], "", None

    def add(self, token: int, p: float) -> str:
        self.tokens.append(token)
        p = min(p, self.pending) if self.pending is not None else p
        decoded = self.tokenizer.decode(self.tokens)
        if decoded.endswith("\ufffd"):
            self.pending = p
            return ""
        self.pending = None
        piece, self.shown = decoded[len(self.shown):], decoded
        return paint(piece, p)

    def flush(self) -> str:
        if self.pending is None:
            return ""
        decoded = self.tokenizer.decode(self.tokens)
        piece, self.shown = decoded[len(self.shown):], decoded
        return paint(piece, self.pending)

    @staticmethod
    def legend() -> str:
        return "probability: " + " ".join(paint(label, bound + 0.01) for bound, _, label in COLOURS)


def paint(text: str, p: float) -> str:
    code = next(c for bound, c, _ in COLOURS if p > bound or bound == 0.0)
    return f"{code}{text}{RESET}" if text else ""


def read_few_shot(source: str) -> list:
    path = Path(source).expanduser()
    try:
        messages = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cot_source={source}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cot_source={source}: not JSON ({e})") from None
    if isinstance(messages, dict) and "messages" in messages:
        messages = messages["messages"]
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ConfigError(f"cot_source={source}: want a JSON list of {{\"role\": ..., \"content\": ...}} messages")
    return [m for m in messages if m["role"] != "system"]


@hydra.main(config_path="pkg://tuning_fork.conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    run_app(generate, cfg)


if __name__ == "__main__":
    main()
