"""Bad input: one clear line naming the culprit, exit code 2, no traceback, nothing on disk lost.

Most cases run in-process (the error train() raises is what the CLI prints as its one line); a few go
through the real CLI to keep the one-line contract itself tested."""

import json

import pytest

from tuning_fork.errors import TuningForkError

from .conftest import chat, compose_cfg, make_data, one_line_error, run_cli, write_jsonl


def train_on(folder, tmp_path, *extra):
    return run_cli("data=jsonl", f"data.path={folder}", f"hydra.run.dir={tmp_path / 'run'}", *extra)


def refused(folder, tmp_path, *needles, extra=()):
    """train() on this data refuses it before writing anything, naming each of `needles`."""
    from tuning_fork.train import train

    with pytest.raises(TuningForkError) as e:
        train(compose_cfg("data=jsonl", f"data.path={folder}", f"output_dir={tmp_path / 'run'}", *extra))
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert not (tmp_path / "run" / "adapters").exists()
    return message


def test_missing_data_folder(tmp_path):
    one_line_error(train_on(tmp_path / "nowhere", tmp_path), "nowhere", "no such folder")


def test_missing_validation_split(tmp_path):
    folder = make_data(tmp_path / "d")
    (folder / "valid.jsonl").unlink()
    refused(folder, tmp_path, "valid.jsonl", "missing")


def test_line_that_is_not_json(tmp_path):
    folder = make_data(tmp_path / "d")
    lines = (folder / "train.jsonl").read_text().splitlines()
    lines[2] = '{"messages": [oops'
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    refused(folder, tmp_path, "train.jsonl:3", "not valid JSON")


def test_record_lacking_its_fields(tmp_path):
    folder = make_data(tmp_path / "d", fmt="completions")
    recs = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
    recs[4] = {"question": "no known field"}
    write_jsonl(folder / "train.jsonl", recs)
    refused(folder, tmp_path, "train.jsonl:5", "no known fields")


def test_chat_message_without_content(tmp_path):
    folder = make_data(tmp_path / "d")
    write_jsonl(folder / "valid.jsonl", [chat("q", "a"), {"messages": [{"role": "user"}]}])
    refused(folder, tmp_path, "valid.jsonl:2", "content")


def test_mixed_formats(tmp_path):
    folder = make_data(tmp_path / "d")
    with open(folder / "train.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "plain text"}) + "\n")
    refused(folder, tmp_path, "train.jsonl:25", "text record in a chat split")


def test_empty_split(tmp_path):
    folder = make_data(tmp_path / "d")
    (folder / "valid.jsonl").write_text("\n")
    refused(folder, tmp_path, "valid", "empty")


def test_not_utf8(tmp_path):
    folder = make_data(tmp_path / "d")
    (folder / "train.jsonl").write_bytes(b'{"text": "ok"}\n\xff\xfe\x00binary\n')
    refused(folder, tmp_path, "train.jsonl:2", "UTF-8")


def test_fewer_records_than_a_batch(tmp_path):
    folder = make_data(tmp_path / "d", n_train=3)
    refused(folder, tmp_path, "3 training records", "batch_size=4", extra=["schedule.batch_size=4"])


def test_model_path_that_does_not_exist(tmp_path):
    folder = make_data(tmp_path / "d")
    refused(folder, tmp_path, "model.path", "no such folder", extra=[f"model.path={tmp_path}/no-model"])


@pytest.mark.parametrize("override,key", [("schedule.batch_size=0", "schedule.batch_size"),
                                          ("schedule.epochs=0", "schedule.epochs")])
def test_values_below_one(tmp_path, override, key):
    one_line_error(run_cli(override, f"hydra.run.dir={tmp_path / 'run'}"), key)


def test_jsonl_without_a_path(tmp_path):
    one_line_error(run_cli("data=jsonl", f"hydra.run.dir={tmp_path / 'run'}"), "data.path")


def test_unknown_key_is_reported_by_hydra(tmp_path):
    proc = run_cli("adapter.rnak=4", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "rnak" in proc.stderr and "Did you mean" in proc.stderr


def test_a_finished_run_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iteration": 1, "train_loss": 1.0}\n')
    one_line_error(run_cli(f"hydra.run.dir={run}"), str(run), "already holds a run")
    assert (run / "metrics.jsonl").read_text() == '{"iteration": 1, "train_loss": 1.0}\n'


def test_the_demo_recipe_is_refused_for_another_model(tmp_path):
    folder = make_data(tmp_path / "d")
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    refused(folder, tmp_path, "schedule=default", "model.path=", extra=[f"model.path={model}", "schedule=demo"])


def test_records_longer_than_max_seq_length_can_be_refused(tmp_path):
    folder = make_data(tmp_path / "d")
    refused(folder, tmp_path, "train.jsonl:1:", "longer than data.max_seq_length=16", "data.too_long=truncate or drop",
            extra=["data.max_seq_length=16", "data.too_long=error"])


def test_too_long_records_are_counted_then_truncated_or_dropped():
    from omegaconf import OmegaConf

    from tuning_fork.data import Split, limit_lengths

    split = Split("train", "t.jsonl", [{}] * 4, [1, 2, 5, 9], "text")
    encoded = [([1] * n, ((0, n),)) for n in (5, 50, 8, 70)]
    cfg = lambda mode: OmegaConf.create({"max_seq_length": 10, "too_long": mode})
    kept, note = limit_lengths(encoded, split, cfg("truncate"))
    assert kept == encoded and "2 of 4 records are longer than data.max_seq_length=10" in note
    assert "longest 70" in note and "t.jsonl:2" in note and "truncated" in note
    kept, note = limit_lengths(encoded, split, cfg("drop"))
    assert [len(ids) for ids, _ in kept] == [5, 8] and "2 of 4" in note and "dropped" in note
    assert limit_lengths(encoded[:1], split, cfg("drop")) == (encoded[:1], None)
