"""`python -m tuning_fork.serve`: an OpenAI-compatible server on a run's model and adapters (mlx_lm.server).

    python -m tuning_fork.serve run=outputs/2026-11-29/10-00-00                 # http://127.0.0.1:8080/v1
    python -m tuning_fork.serve run=RUN checkpoint=last port=9000 host=0.0.0.0   # another port, any interface

The server is mlx-lm's, not ours: this app only chooses what it loads — the run's base model and adapters
(its best, unless checkpoint=last) — and prompts the model as it was trained (the run's prompt format, handed
to the server as a chat template). Requests: POST /v1/chat/completions and /v1/completions.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from .cli import run_app
from .config import register
from .errors import ConfigError

register()


def server_args(cfg) -> list[str]:
    """mlx_lm.server's command line for this run."""
    from .generate import choose_model
    from .models import resolve
    from .prompts import JINJA

    if not cfg.run and not cfg.adapter_path and cfg.model.path == "tiny":
        raise ConfigError("run= is not set: point it at a finished training run's folder (or set model.path)")
    base, adapters, adapter_config, fmt = choose_model(cfg)
    if adapter_config.get("quantization"):
        raise ConfigError(f"run={cfg.run}: its adapters were trained on a base quantized at load "
                          "(model.quantize_bits), which mlx_lm.server cannot rebuild: export it first "
                          f"(python -m tuning_fork.export run={cfg.run}) and serve the export (model.path=...)")
    args = ["--model", resolve(base), "--host", cfg.host, "--port", str(cfg.port), "--temp", str(cfg.temperature),
            "--max-tokens", str(cfg.max_tokens), "--log-level", cfg.log_level]
    if adapters:
        args += ["--adapter-path", adapters]
    if fmt != "tokenizer":
        args += ["--chat-template", JINJA[str(fmt)]]
    if cfg.trust_remote_code or cfg.model.trust_remote_code:
        args.append("--trust-remote-code")
    return args


def serve(cfg) -> None:
    from mlx_lm import server

    args = server_args(cfg)
    where = f"http://{cfg.host}:{cfg.port}/v1"
    print(f"tuning_fork: serving {args[1]}" + (f" with {args[args.index('--adapter-path') + 1]}"
                                               if "--adapter-path" in args else "") + f" at {where} (Ctrl-C stops)",
          flush=True)
    sys.argv = ["mlx_lm.server", *args]
    server.main()


@hydra.main(config_path="pkg://tuning_fork.conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    run_app(serve, cfg)


if __name__ == "__main__":
    main()
