"""`python -m tuning_fork ...`: the training app. A thin Hydra wrapper around train.train(cfg)."""

import hydra
from omegaconf import DictConfig

from .cli import run_app
from .config import register

register()


@hydra.main(config_path="conf", config_name="config")
def main(cfg: DictConfig):
    if cfg.summary:
        from .summary import summarize

        run_app(summarize, cfg)
        return None
    from .train import train

    metrics = run_app(train, cfg)
    return metrics.get(cfg.optimized_metric)  # what a sweeper optimizes


if __name__ == "__main__":
    main()
