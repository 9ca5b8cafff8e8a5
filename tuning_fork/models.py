"""Models: the built-in tiny model, loading a base model, quantizing it, and fitting adapters."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ConfigError

TINY = "tiny"  # `model.path` value that names the built-in model
TINY_VERSION = 2  # bump when the recipe below changes: the cache folder is keyed on it

TINY_ARCH = dict(
    model_type="llama",
    hidden_size=128,
    num_hidden_layers=2,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=4,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
TINY_VOCAB = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cache_dir() -> Path:
    root = os.environ.get("TUNING_FORK_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    ) / "tuning_fork"
    return Path(root)


def tiny_model_path() -> Path:
    """The built-in model's folder, built on first use (a few seconds, no network)."""
    path = cache_dir() / f"tiny-v{TINY_VERSION}"
    if not (path / "model.safetensors").exists():
        build_tiny(path)
    return path


def _tokenizer_corpus():
    """Every text the demo data holds: the tokenizer learns its merges from them. (The preference pairs,
    made from the same conversations, are left out: tiny-v2's tokenizer stays what it was.)"""
    from .data import demo_dir

    for f in sorted(demo_dir().rglob("*.jsonl")):
        if "preference" in f.relative_to(demo_dir()).parts:
            continue
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if "messages" in rec:
                yield from (m["content"] for m in rec["messages"])
            else:
                yield from (str(v) for v in rec.values())


def build_tiny(path: Path) -> Path:
    """Build a 2-layer, 128-wide Llama with a byte-level BPE tokenizer, deterministically.

    Written to a temporary folder and renamed, so concurrent first uses (parallel sweep jobs) never
    see half a model."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=TINY_VOCAB,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_tokenizer_corpus(), trainer)
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class="PreTrainedTokenizerFast",
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token=None,
            chat_template=CHATML_TEMPLATE,
            model_max_length=TINY_ARCH["max_position_embeddings"],
        ), indent=2))

        vocab = tok.get_vocab_size()
        config = dict(TINY_ARCH, vocab_size=vocab, eos_token_id=tok.token_to_id("<|im_end|>"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        mx.random.seed(0)
        model = llama.Model(llama.ModelArgs.from_dict(config))
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
        try:
            tmp.rename(path)
        except OSError:  # another process finished first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# ------------------------------------------------------------------------------------------------ loading


def resolve(path: str) -> str:
    """`model.path` as mlx-lm's load() takes it: the built-in model's folder, a local folder, or a hub id."""
    if path == TINY:
        return str(tiny_model_path())
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ConfigError(f"model.path={path}: the folder has no config.json: point it at an MLX or "
                              "Hugging Face model folder")
        return str(local.resolve())
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local:
        raise ConfigError(f"model.path={path}: no such folder (a hub id looks like org/name)")
    return path


def load(model_cfg, adapter_path: str | None = None):
    """Load base model and tokenizer (and adapters, if given) with one clear error for any failure."""
    from mlx_lm import load as mlx_load

    path = resolve(model_cfg.path)
    try:
        model, tokenizer = mlx_load(
            path,
            adapter_path=adapter_path,
            revision=model_cfg.revision,
            tokenizer_config={"trust_remote_code": model_cfg.trust_remote_code},
            trust_remote_code=model_cfg.trust_remote_code,
        )
    except Exception as e:  # hub, file and architecture errors all surface here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if Path(path).exists() else " (is the hub reachable? HF_HUB_OFFLINE=1 uses the local cache only)"
        raise ConfigError(f"model.path={model_cfg.path}: cannot load it: {first}{hint}") from None
    return model, tokenizer


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer alone (a hub model downloads its tokenizer files, not its weights)."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    try:
        return mlx_load_tokenizer(path, {"trust_remote_code": trust_remote_code})
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.path={path}: cannot load its tokenizer: {first} (is the hub reachable? "
                          "HF_HUB_OFFLINE=1 uses the local cache only)") from None


def is_quantized(model) -> bool:
    import mlx.nn as nn

    return any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def import_tuner():
    """Import mlx_lm.tuner without W&B. Its package imports wandb (1.2 s of every start-up) for reporting
    callbacks tuning_fork never uses; tracking.py imports wandb itself when a run logs to W&B."""
    import sys

    if "mlx_lm.tuner" in sys.modules or "wandb" in sys.modules:
        return
    sys.modules["wandb"] = None  # `import wandb` raises ImportError, which mlx-lm takes as "not installed"
    try:
        import mlx_lm.tuner  # noqa: F401
    finally:
        del sys.modules["wandb"]


def attach(model, adapter, model_cfg) -> dict:
    """Make the chosen part of `model` trainable; return the adapter_config.json mlx-lm reads back."""
    import mlx.nn as nn

    import_tuner()
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_blocks = len(model.layers)
    num_layers = n_blocks if adapter.num_layers == -1 else min(adapter.num_layers, n_blocks)
    quantization = None
    if adapter.type == "qlora" and not is_quantized(model):
        bits = model_cfg.quantize_bits or 4
        nn.quantize(model, group_size=model_cfg.quantize_group_size, bits=bits)
        quantization = {"bits": bits, "group_size": model_cfg.quantize_group_size}
    elif adapter.type != "qlora" and model_cfg.quantize_bits:
        nn.quantize(model, group_size=model_cfg.quantize_group_size, bits=model_cfg.quantize_bits)
        quantization = {"bits": model_cfg.quantize_bits, "group_size": model_cfg.quantize_group_size}
    model.freeze()

    config = {"fine_tune_type": fine_tune_type(adapter.type), "num_layers": num_layers}
    if adapter.type == "full":
        if quantization or is_quantized(model):
            raise ConfigError("adapter=full cannot train a quantized model: use adapter=lora (QLoRA) or an "
                              "unquantized model.path")
        for block in model.layers[-num_layers:]:
            block.unfreeze()
    else:
        params = {"rank": adapter.rank,
                  "scale": adapter.scale if adapter.scale is not None else adapter.alpha / adapter.rank,
                  "dropout": adapter.dropout}
        if keys := adapter.get("keys"):  # (`adapter.keys` is DictConfig's method)
            params["keys"] = list(keys)
            known = {k for k, _ in model.layers[-1].named_modules()}
            if unknown := [k for k in params["keys"] if k not in known]:
                linears = sorted(k for k, m in model.layers[-1].named_modules()
                                 if isinstance(m, (nn.Linear, nn.QuantizedLinear)))
                raise ConfigError(f"adapter.keys: {unknown} name no module of this model's blocks; "
                                  f"choose from {linears}")
        linear_to_lora_layers(model, num_layers, params, use_dora=adapter.type == "dora")
        config["lora_parameters"] = params
    if quantization:
        config["quantization"] = quantization
    return config


def fine_tune_type(adapter_type) -> str:
    """mlx-lm's fine_tune_type for an adapter type: QLoRA is LoRA on a quantized model."""
    return "lora" if adapter_type == "qlora" else str(adapter_type)


def require_chat_template(tokenizer, name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{name} has no chat template: choose a prompt format "
                          "(prompt=chatml|llama3|mistral|alpaca|phi|gemma)")


def trainable_weights(model) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model, folder: Path, name: str = "adapters.safetensors") -> Path:
    """Write the trainable weights atomically: a crash never leaves a truncated file behind."""
    import mlx.core as mx

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp.safetensors"
    mx.save_safetensors(str(tmp), trainable_weights(model))
    os.replace(tmp, folder / name)
    return folder / name


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- chaining


def check_trainable(base: str, adapter) -> None:
    """adapter=full on an already quantized model is refused before its weights load."""
    config = Path(base) / "config.json"
    if adapter.type == "full" and config.exists() and "quantization" in json.loads(config.read_text()):
        raise ConfigError(f"adapter=full cannot train a quantized model ({base} is quantized): use adapter=lora "
                          "(QLoRA) or an unquantized model.path")


def chain_source(cfg, build: bool = False) -> tuple[str, Path, dict]:
    """(base model, adapters folder, its adapter_config) of a run chained from `init_from`: its best
    adapters unless pipeline.carry=last. After a full fine-tune the base is that run's updated weights,
    a model folder written once when `build` (before that, its own base, for the tokenizer)."""
    source, previous = read_run(cfg.init_from, cfg.pipeline.carry)
    if previous.get("fine_tune_type") != "full" or not build:
        return previous["model"], source, previous
    return chain_base(source, previous), source, previous


def read_run(folder: str, carry: str = "last") -> tuple[Path, dict]:
    """The adapters folder of a finished run or stage (or an adapters folder itself) and its config;
    carry=best: its best adapters (adapters/best) when it has them."""
    path = Path(folder).expanduser()
    adapters = path / "adapters" if (path / "adapters").is_dir() else path
    if carry == "best" and (adapters / "best" / "adapters.safetensors").exists():
        adapters = adapters / "best"
    if not (adapters / "adapter_config.json").exists() or not (adapters / "adapters.safetensors").exists():
        raise ConfigError(f"init_from={folder}: no finished adapters there (adapters/adapter_config.json and "
                          "adapters.safetensors): point it at a finished run or stage folder")
    return adapters, json.loads((adapters / "adapter_config.json").read_text())


def chain_base(adapters: Path, previous: dict) -> str:
    """The base a run chained from `adapters` starts on: the same base after LoRA/DoRA; after a full
    fine-tune, the updated weights, written once as a model folder beside the adapters (`model/`)."""
    if previous.get("fine_tune_type") != "full":
        return previous["model"]
    run = adapters.parent.parent if adapters.name == "best" else adapters.parent
    folder = run / ("model" if adapters.name == "best" or not (adapters / "best").exists() else "model-last")
    if not (folder / "config.json").exists():
        from mlx_lm import load as mlx_load
        from mlx_lm.utils import save

        model, tokenizer, config = mlx_load(previous["model"], adapter_path=str(adapters), return_config=True)
        tmp = folder.with_name(".model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save(tmp, previous["model"], model, tokenizer, config, donate_model=False)
        os.replace(tmp, folder)
    return str(folder.resolve())


def check_chain(source: str, previous: dict, new: dict) -> None:
    """Adapters carry over only into adapters of the same kind and shape; a full fine-tune carries over
    into anything (as the new base)."""
    if previous.get("fine_tune_type") == "full":
        return
    pairs = [("fine_tune_type", previous.get("fine_tune_type"), new["fine_tune_type"]),
             ("num_layers", previous.get("num_layers"), new["num_layers"]),
             ("quantization", previous.get("quantization"), new.get("quantization"))]
    if new["fine_tune_type"] != "full":
        p, n = previous.get("lora_parameters", {}), new["lora_parameters"]
        pairs += [("rank", p.get("rank"), n["rank"]), ("keys", p.get("keys"), n.get("keys"))]
    if bad := [f"{k} {a} -> {b}" for k, a, b in pairs if a != b]:
        raise ConfigError(f"init_from={source}: its adapters cannot carry over ({'; '.join(bad)}): use the same "
                          "adapter settings as that run, or start without init_from")


def load_previous(model, adapters: Path) -> None:
    import mlx.core as mx

    weights = mx.load(str(adapters / "adapters.safetensors"))
    mine = trainable_weights(model)
    if missing := [k for k in weights if k not in mine]:
        raise ConfigError(f"init_from={adapters.parent}: {len(missing)} of its tensors fit no adapter here "
                          f"(e.g. {missing[0]})")
    model.load_weights(list(weights.items()), strict=False)
