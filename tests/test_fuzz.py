"""Fuzz and property tests: whatever the input, our parsers return a result or one of our clean errors."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from tuning_fork import data, schedule
from tuning_fork.errors import TuningForkError
from tuning_fork.pipeline import _merge
from tuning_fork.prompts import parse_markers

FIELDS = OmegaConf.create({"text_feature": "text", "prompt_feature": "prompt", "completion_feature": "completion",
                           "chat_feature": "messages", "chosen_feature": "chosen", "rejected_feature": "rejected",
                           "system_feature": "system"})
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                        max_size=4), max_leaves=12)
records = st.one_of(
    st.fixed_dictionaries({"text": st.one_of(st.text(), json_values)}),
    st.fixed_dictionaries({"prompt": json_values, "completion": json_values}),
    st.fixed_dictionaries({"messages": st.one_of(json_values, st.lists(st.dictionaries(
        st.sampled_from(["role", "content", "tool_calls"]), json_values, max_size=3), max_size=3))}),
    json_values)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=400))
def test_the_jsonl_reader_takes_any_bytes(tmp_path, raw):
    path = tmp_path / "train.jsonl"
    path.write_bytes(raw)
    try:
        recs, lines = data.read_jsonl(path)
        data.check_records("train", str(path), recs, lines, FIELDS)
    except TuningForkError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recs=st.lists(records, max_size=6))
def test_any_json_records_are_accepted_or_named_by_line(tmp_path, recs):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    try:
        split = data.check_records("train", str(path), *data.read_jsonl(path), FIELDS)
        assert len(split.records) == len(recs)
    except TuningForkError as e:
        message = str(e)
        assert message.startswith(str(path)) and "\n" not in message
        if recs:  # names the line at fault
            assert message.startswith(f"{path}:") or "empty" in message


names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
values = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20).filter(
    lambda v: "]" not in v and v == v.strip())


@settings(max_examples=200, deadline=None)
@given(markers=st.dictionaries(names, values, min_size=1, max_size=4))
def test_markers_written_as_a_string_read_back(markers):
    text = " ".join(f"{k}=[{v}]" for k, v in markers.items())
    assert parse_markers(text) == markers


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=60))
def test_any_marker_string_parses_or_is_one_clean_error(text):
    try:
        out = parse_markers(text)
        assert isinstance(out, dict)
    except TuningForkError as e:
        assert "prompt.loom_markers=" in str(e) and "\n" not in str(e)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=20), epoch=st.integers(1, 10_000))
def test_any_interval_text_parses_or_is_one_clean_error(text, epoch):
    try:
        assert schedule.parse_interval(text, epoch, "eval_every") >= 0
    except TuningForkError as e:
        assert "schedule.eval_every=" in str(e)


@given(n=st.integers(0, 10**6), x=st.floats(0, 100, allow_nan=False), epoch=st.integers(1, 10_000))
def test_interval_units(n, x, epoch):
    assert schedule.parse_interval(f"{n}it", epoch, "k") == n == schedule.parse_interval(str(n), epoch, "k")
    assert schedule.parse_interval(f"{x!r}ep", epoch, "k") == int(x * epoch)


override = st.tuples(st.sampled_from(["", "+", "~"]), st.sampled_from(["a", "b.c", "d", "e.f.g"]),
                     st.text(max_size=5)).map(lambda t: f"{t[0]}{t[1]}={t[2]}")


@given(stage=st.lists(override, max_size=6), user=st.lists(override, max_size=6))
def test_command_line_overrides_win_over_a_stages_and_keep_their_order(stage, user):
    merged = _merge(stage, user)
    key = lambda o: o.split("=", 1)[0].lstrip("+~")
    assert merged[len(merged) - len(user):] == user
    assert not {key(o) for o in merged[:len(merged) - len(user)]} & {key(o) for o in user}
