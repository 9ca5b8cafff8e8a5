"""python -m tuning_fork.plot: loss curves of a run, of a folder of runs, and its errors."""

import json

from tuning_fork.plot import find_runs, main
from tuning_fork.tracking import read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(folder, losses, cut_short=False):
    folder.mkdir(parents=True)
    lines = [json.dumps({"iteration": 0, "val_loss": losses[0]})]
    lines += [json.dumps({"iteration": i, "train_loss": v}) for i, v in enumerate(losses[1:], 1)]
    lines.append(json.dumps({"iteration": len(losses) - 1, "val_loss": losses[-1]}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n" + ('{"iteration": 9, "tr' if cut_short else ""))
    return folder


def test_one_run_is_drawn_into_its_folder(tmp_path, capsys):
    run = fake_run(tmp_path / "run", [3.0, 2.5, 2.0, 1.5], cut_short=True)
    assert [r["iteration"] for r in read_metrics(run)] == [0, 1, 2, 3, 3]  # the cut-short line is skipped
    assert main([str(run)]) == 0
    assert (run / "loss.png").read_bytes().startswith(PNG)
    assert capsys.readouterr().out.strip() == str(run / "loss.png")


def test_a_folder_of_runs_gives_one_curve_each_in_numeric_order(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    for n in (10, 2, 0):
        fake_run(sweep / str(n), [3.0, 2.0 + n / 100])
    (sweep / "notes").mkdir()  # not a run
    assert [p.name for p in find_runs(sweep)] == ["0", "2", "10"]
    monkeypatch.chdir(tmp_path)
    assert main([str(sweep), str(fake_run(tmp_path / "other", [3.0, 1.0]))]) == 0
    assert (tmp_path / "loss.png").read_bytes().startswith(PNG)  # several runs: ./loss.png


def test_a_folder_without_runs_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and "metrics.jsonl" in err[0]
    assert main([str(fake_run(tmp_path / "run", [1.0, 0.5])), "--out", str(tmp_path / "no" / "x.png")]) == 2
    assert "no folder" in capsys.readouterr().err
