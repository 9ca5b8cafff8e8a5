"""`python -m tuning_fork.plot RUN [RUN ...]`: training and validation loss curves of runs, in one PNG.

A RUN is a run folder (it holds metrics.jsonl) or a folder of runs: a pipeline's stages, or a multirun's
jobs, each plotted as its own curve. One run's picture goes to RUN/loss.png; several runs' to ./loss.png.
`--out FILE` puts it elsewhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import command_error
from .tracking import read_metrics


def find_runs(folder: Path) -> list[Path]:
    """The run folders in `folder`: itself, or its subfolders (stages, jobs) in name order, numbers by value."""
    if (folder / "metrics.jsonl").exists():
        return [folder]
    runs = [p for p in folder.iterdir() if (p / "metrics.jsonl").exists()] if folder.is_dir() else []
    return sorted(runs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def label_of(run: Path, arguments: list[Path]) -> str:
    for folder in arguments:
        if run == folder:
            return run.name
        if run.parent == folder:
            return f"{folder.name}/{run.name}"
    return str(run)


def plot(runs: list[Path], labels: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for run, label in zip(runs, labels):
        rows = read_metrics(run)
        for ax, key in ((train_ax, "train_loss"), (val_ax, "val_loss")):
            points = [(r["iteration"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=label)
    for ax, title in ((train_ax, "training loss"), (val_ax, "validation loss")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    train_ax.set_ylabel("loss (per target token)")
    val_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuning_fork.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, or folders of runs (pipeline, multirun)")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: RUN/loss.png, or ./loss.png for several)")
    args = parser.parse_args(argv)

    runs = []
    for folder in args.runs:
        found = find_runs(folder)
        if not found:
            return fail(f"{folder}: no metrics.jsonl in it or in its subfolders: give a tuning_fork run folder "
                        "(outputs/DATE/TIME), a pipeline's folder or a multirun's folder")
        runs += found
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return fail("plotting needs matplotlib, which tuning_fork installs: pip install matplotlib")
    out = args.out or (runs[0] / "loss.png" if len(runs) == 1 else Path("loss.png"))
    if not out.parent.is_dir():
        return fail(f"--out {out}: no folder {out.parent}")
    plot(runs, [label_of(run, args.runs) for run in runs], out)
    print(out)
    return 0


def fail(message: str) -> int:
    return command_error("tuning_fork.plot", message)


if __name__ == "__main__":
    sys.exit(main())
