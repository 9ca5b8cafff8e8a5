"""`python -m tuning_fork.export`: a run's adapters fused into its base, written as a model others can run.

    python -m tuning_fork.export run=outputs/2026-11-29/10-00-00                      # mlx, RUN/export/mlx
    python -m tuning_fork.export run=RUN format=mlx quantize.bits=4                    # mlx, 4-bit
    python -m tuning_fork.export run=RUN format=hf                                     # Transformers (de-quantized)
    python -m tuning_fork.export run=RUN format=gguf                                   # llama.cpp, Ollama
    python -m tuning_fork.export run=RUN push.repo=me/my-model                         # and upload it

Reads top to bottom: load the model as `tuning_fork.generate` does (the same adapters, the same QLoRA base),
fuse, convert for the format, write into a fresh folder and rename it into place (an existing export is never
overwritten unless overwrite=true), write a model card, then push. The fusing, de-quantizing, quantizing and
GGUF writing are mlx-lm's (mlx_lm.fuse's pieces); the upload is huggingface_hub's, in one commit.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .cli import run_app
from .config import register
from .errors import ConfigError, TuningForkError

register()

GGUF_TYPES = ("llama", "mistral", "mixtral")  # what mlx-lm's GGUF writer supports (mlx_lm/fuse.py)
DTYPES = ("float16", "bfloat16", "float32")


def export(cfg) -> Path:
    from .generate import choose_model

    if not cfg.run and not cfg.adapter_path:
        raise ConfigError("run= is not set: point it at a finished training run's folder "
                          "(or set model.path and adapter_path)")
    base, adapters, adapter_config, fmt = choose_model(cfg)
    out = output_folder(cfg)
    check_request(cfg, base)
    tic = time.perf_counter()
    model, tokenizer, config = fused_model(cfg, base, adapters, adapter_config)
    if fmt != "tokenizer":  # the export is prompted as the run was trained (Ollama, LM Studio, Transformers)
        from .prompts import JINJA

        tokenizer._tokenizer.chat_template = JINJA[str(fmt)]
    with staging(out, cfg.overwrite) as tmp:
        write(cfg, tmp, base, model, tokenizer, config)
        write_card(cfg, tmp, base, adapters)
    seconds = time.perf_counter() - tic
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"tuning_fork: exported {cfg.format} to {out} ({size / 1e6:,.1f} MB in {seconds:.1f} s)")
    print(f"tuning_fork: next: {next_step(cfg, out)}")
    if cfg.push.repo:
        push(out, cfg.push.repo, cfg.push.private)
    return out


def output_folder(cfg) -> Path:
    if cfg.out:
        return Path(cfg.out).expanduser().resolve()
    if not cfg.run:
        raise ConfigError("out= is not set: name the folder to write (or export a run=, which writes to "
                          "RUN/export/<format>)")
    name = str(cfg.format) + (f"-{cfg.quantize.bits}bit" if cfg.quantize.bits else "")
    return (Path(cfg.run).expanduser() / "export" / name).resolve()


def check_request(cfg, base: str) -> None:
    """What cannot work, said before any weights load."""
    from mlx_lm.utils import load_config

    from .models import resolve

    q = cfg.quantize
    if q.bits is not None and cfg.format != "mlx":
        raise ConfigError(f"quantize.bits={q.bits} with format={cfg.format}: only format=mlx is written quantized "
                          "(Transformers and mlx-lm's GGUF writer take unquantized weights); leave quantize.bits unset")
    if q.bits is not None and q.bits not in (2, 3, 4, 5, 6, 8):
        raise ConfigError(f"quantize.bits={q.bits} is invalid: use 2, 3, 4, 5, 6 or 8")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype} is invalid: use one of {', '.join(DTYPES)}, or null (the model's)")
    if cfg.format == "gguf":
        model_type = load_config(Path(resolve(base))).get("model_type")
        if model_type not in GGUF_TYPES:
            raise ConfigError(f"format=gguf: mlx-lm's GGUF writer supports {', '.join(GGUF_TYPES)}, not {model_type}: "
                              "export format=hf and convert that folder with llama.cpp's convert_hf_to_gguf.py")


def fused_model(cfg, base: str, adapters: str | None, adapter_config: dict):
    """The model with its adapters fused in, de-quantized or (re)quantized for the format; its config."""
    import mlx.core as mx
    from mlx.utils import tree_map, tree_unflatten
    from mlx_lm.utils import dequantize_model, load_config, quantize_model

    from .generate import load_model
    from .models import is_quantized, resolve

    model, tokenizer = load_model(cfg, base, adapters, adapter_config)
    config = load_config(Path(resolve(base)))
    plain = cfg.format != "mlx" or cfg.quantize.bits is not None  # full-precision weights wanted
    fused = [(name, m.fuse(dequantize=plain)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if plain and is_quantized(model):
        model = dequantize_model(model)
    if plain:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    elif is_quantized(model) and "quantization" not in config:  # QLoRA quantized the base at load: say how
        q = adapter_config["quantization"]
        config["quantization"] = {"group_size": q["group_size"], "bits": q["bits"]}
    if cfg.dtype or cfg.format == "gguf":  # GGUF: mlx-lm writes float16
        dtype = getattr(mx, cfg.dtype or "float16")
        model.update(tree_map(lambda w: w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w,
                              model.parameters()))
        config["torch_dtype"] = cfg.dtype or "float16"
    if cfg.quantize.bits:
        model, config = quantize_model(model, config, cfg.quantize.group_size, cfg.quantize.bits)
    model.eval()
    return model, tokenizer, config


def write(cfg, folder: Path, base: str, model, tokenizer, config: dict) -> None:
    from mlx.utils import tree_flatten
    from mlx_lm.gguf import convert_to_gguf
    from mlx_lm.utils import save

    from .models import resolve

    save(folder, resolve(base), model, tokenizer, dict(config), donate_model=False)
    if cfg.format == "gguf":  # the GGUF file beside the safetensors it was made from (its tokenizer is read there)
        convert_to_gguf(folder, dict(tree_flatten(model.parameters())), dict(config), str(folder / "model.gguf"))
        for f in folder.glob("model*.safetensors*"):
            f.unlink()


class staging:
    """A fresh folder beside `out`, renamed into place when all went well; removed when it did not. An
    existing `out` is refused, or replaced only after the new one is whole (overwrite=true)."""

    def __init__(self, out: Path, overwrite: bool):
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise ConfigError(f"out={out} exists and is not empty: choose another out=, or overwrite=true to replace it")
        self.out, self.overwrite = out, overwrite

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}-replaced")
            self.out.rename(old)
            self.tmp.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.out)


# --------------------------------------------------------------------------------------------- the card


def write_card(cfg, folder: Path, base: str, adapters: str | None) -> None:
    """README.md: the base model, the data, the training config and the run's results (huggingface_hub's
    model card format, so the hub shows its metadata)."""
    from huggingface_hub import ModelCard, ModelCardData

    run = Path(cfg.run).expanduser() if cfg.run else None
    train_cfg = OmegaConf.load(run / ".hydra" / "config.yaml") if run and (run / ".hydra" / "config.yaml").exists() else None
    results = json.loads((run / "results.json").read_text()) if run and (run / "results.json").exists() else {}
    hub_base = train_cfg.model.path if train_cfg is not None and "/" in str(train_cfg.model.path) and \
        not Path(str(train_cfg.model.path)).expanduser().exists() else None
    library = {"mlx": "mlx", "hf": "transformers", "gguf": "gguf"}[str(cfg.format)]
    data = ModelCardData(library_name=library, base_model=hub_base, pipeline_tag="text-generation",
                         tags=["tuning_fork", "mlx", str(train_cfg.adapter.type) if train_cfg is not None else "fine-tuned"])
    lines = [f"# {folder.name if not cfg.run else Path(cfg.run).name}", "",
             f"Fine-tuned with tuning_fork (LoRA, DoRA, QLoRA and full fine-tuning on MLX), exported as `{cfg.format}`"
             + (f" ({cfg.quantize.bits}-bit)" if cfg.quantize.bits else "") + ".", "",
             f"- **Base model:** `{train_cfg.model.path if train_cfg is not None else base}`",
             f"- **Adapters:** `{adapters}` ({cfg.checkpoint})"]
    if train_cfg is not None:
        d, s, a = train_cfg.data, train_cfg.schedule, train_cfg.adapter
        lines += [f"- **Data:** {d.source}" + (f" `{d.path}`" if d.path else "")
                  + (f", sources {', '.join(d.sources)}" if d.get("sources") else ""),
                  f"- **Objective:** {train_cfg.objective.name}; **adapter:** {a.type}"
                  + (f", rank {a.rank}" if a.type != "full" else ""),
                  f"- **Schedule:** {s.optimizer}, learning rate {s.learning_rate}, batch {s.batch_size}, "
                  f"{results.get('iters', s.get('iters'))} iterations",
                  f"- **Prompt format:** {train_cfg.prompt.format}"]
    if results:
        lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in results.items() if isinstance(v, float)]
    if train_cfg is not None:
        lines += ["", "## Training configuration", "", "```yaml", OmegaConf.to_yaml(train_cfg).strip(), "```"]
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").save(folder / "README.md")


def next_step(cfg, out: Path) -> str:
    if cfg.format == "mlx":
        return f'python -m mlx_lm generate --model {out} --prompt "Hello"'
    if cfg.format == "hf":
        return f"AutoModelForCausalLM.from_pretrained('{out}') (Transformers), or llama.cpp's convert_hf_to_gguf.py {out}"
    return f"llama-cli -m {out / 'model.gguf'} (llama.cpp), or an Ollama Modelfile: FROM {out / 'model.gguf'}"


def push(folder: Path, repo: str, private: bool) -> None:
    """Upload the export folder in one commit; with no network, one line (the local export stays whole)."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id=repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          commit_message="tuning_fork export")
    except Exception as e:  # network, authentication, offline mode: the hub's errors are many
        head = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TuningForkError(f"push.repo={repo}: the upload failed ({type(e).__name__}: {head}); the export is whole "
                              f"in {folder}: push it later with `hf upload {repo} {folder}`") from None
    print(f"tuning_fork: pushed {folder} to https://huggingface.co/{repo}")


@hydra.main(config_path="pkg://tuning_fork.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    run_app(export, cfg)


if __name__ == "__main__":
    main()
