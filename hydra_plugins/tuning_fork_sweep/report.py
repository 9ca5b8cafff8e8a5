"""What a sweep leaves for people: a table on the terminal, trials.csv, val_loss.png and
optimization_results.yaml in the sweep folder."""

from __future__ import annotations

import csv
from pathlib import Path


def val_curve(run_dir) -> list[tuple[int, float]]:
    from tuning_fork.tracking import read_metrics

    if not run_dir or not (Path(run_dir) / "metrics.jsonl").exists():
        return []
    return [(r["iteration"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]


def rows_of(study) -> list[dict]:
    rows = []
    for t in study.trials:
        curve = val_curve(t.user_attrs.get("run_dir"))
        finite = [v for _, v in curve if v == v and abs(v) != float("inf")]
        duration = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"trial": t.number, "state": t.state.name, "value": t.value,
                     "best_val_loss": min(finite) if finite else None,
                     "duration_s": round(duration, 1) if duration is not None else None,
                     **{f"param:{k}": v for k, v in t.params.items()},
                     "run_dir": t.user_attrs.get("run_dir"), "_curve": curve})
    return rows


def report(study, sweep_dir: Path, direction: str = "minimize", title: str = "sweep") -> list[dict]:
    from omegaconf import OmegaConf
    from rich.console import Console
    from rich.table import Table

    rows = rows_of(study)
    params = sorted({k for r in rows for k in r if k.startswith("param:")})
    columns = ["trial", *params, "best_val_loss", "state", "duration_s", "run_dir"]
    with open(sweep_dir / "trials.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    complete = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    best = (min if direction == "minimize" else max)(complete, key=lambda r: r["value"]) if complete else None
    table = Table(title=f"{title}: {study.study_name} ({len(rows)} trials)")
    for c in ["trial", *[p.split(":", 1)[1] for p in params], "best val loss", "state", "duration"]:
        table.add_column(c, justify="right" if c not in ("state",) else "left")
    for r in rows:
        mark = " *" if best is not None and r["trial"] == best["trial"] else ""
        table.add_row(f"{r['trial']}{mark}", *[_fmt(r.get(p)) for p in params], _fmt(r["best_val_loss"]),
                      r["state"], f"{r['duration_s']:.0f} s" if r["duration_s"] is not None else "")
    import sys

    Console(width=None if sys.stdout.isatty() else 200).print(table)  # (logs: no 80-column truncation)

    plot(rows, best, sweep_dir / "val_loss.png", title)
    if best is not None:
        OmegaConf.save(OmegaConf.create({"name": title, "best_params": {p.split(":", 1)[1]: best[p] for p in params
                                                                        if best.get(p) is not None},
                                         "best_value": best["value"], "best_trial": best["trial"]}),
                       sweep_dir / "optimization_results.yaml")
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def plot(rows, best, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if not r["_curve"]:
            continue
        xs, ys = zip(*r["_curve"])
        is_best = best is not None and r["trial"] == best["trial"]
        ax.plot(xs, ys, linewidth=2.5 if is_best else 1, alpha=1 if is_best else 0.5,
                color="tab:red" if is_best else None, linestyle="--" if r["state"] == "PRUNED" else "-",
                label=f"trial {r['trial']}{' (best)' if is_best else ''} {r['state'].lower()}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{title}: validation loss per trial")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
