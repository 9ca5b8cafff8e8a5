"""`python -m tuning_fork ...`: the training app. A thin Hydra wrapper around train.train(cfg)."""

import hydra
from omegaconf import DictConfig

from .cli import run_app
from .config import register

register()


def app(cfg: DictConfig) -> dict:
    from .distributed import launched_rank
    from .train import output_dir

    if launched_rank() == 0:  # Hydra saved the command line in .hydra/: no credential stays there
        from .tracking import scrub_hydra_files

        scrub_hydra_files(output_dir(cfg))
    if cfg.pipeline.stages:
        from .pipeline import run_pipeline

        return run_pipeline(cfg, output_dir(cfg))
    if cfg.summary:
        from .summary import summarize

        summarize(cfg)
        return {}
    from .train import train

    return train(cfg)


@hydra.main(config_path="pkg://tuning_fork.conf", config_name="config")
def main(cfg: DictConfig):
    metrics = run_app(app, cfg) or {}
    return metrics.get(cfg.optimized_metric)  # what a sweeper optimizes


def cli() -> None:
    """`python -m tuning_fork` and the `tuning-fork` console script."""
    import sys

    from .distributed import hydra_overrides_for_followers

    sys.argv += hydra_overrides_for_followers()  # ranks > 0 of an mlx.launch run write no folder of their own
    main()


if __name__ == "__main__":
    cli()
