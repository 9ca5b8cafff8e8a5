"""A project's own configs compose on top of tuning_fork's: `./conf` of the folder a command runs in (where
`python -m tuning_fork.migrate` writes) is searched before the shipped configs, like `--config-dir conf`."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class ProjectConf(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        folder = Path.cwd() / "conf"
        if folder.is_dir() and not (folder / "__init__.py").exists():  # (not tuning_fork's own conf/)
            search_path.prepend(provider="tuning_fork-project", path=f"file://{folder}")
