"""Masks under real chat templates (tests/templates: Qwen3, DeepSeek-R1, Llama 3.1, Qwen2.5, taken from their
model cards' tokenizer configs) on the built-in model's tokenizer: a record's trained tokens are exactly its
assistant turns — content, reasoning, tool calls and the end-of-turn text — or it is refused in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tuning_fork.chat import Conversations, MaskError

from .conftest import compose_cfg, make_data, write_jsonl

TEMPLATES = Path(__file__).parent / "templates"

WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                              "parameters": {"type": "object",
                                                             "properties": {"city": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

SINGLE = [{"role": "user", "content": "What is 2+2?"},
          {"role": "assistant", "content": "<think>\nadd two and two\n</think>\n\nIt is 4."}]
MULTI = [{"role": "system", "content": "Be brief."}, *SINGLE, {"role": "user", "content": "And 3+3?"},
         {"role": "assistant", "reasoning_content": "add three and three", "content": "It is 6."}]
TOOLS = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
         {"role": "tool", "content": "sunny, 21C"}, {"role": "assistant", "content": "It is sunny in Paris."}]
PLAIN = [{"role": "user", "content": "Name a clef."}, {"role": "assistant", "content": "The treble clef."},
         {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "The bass clef."}]


@pytest.fixture(scope="module")
def tokenizer():
    from mlx_lm.utils import load_tokenizer

    from tuning_fork.models import resolve

    return load_tokenizer(resolve("tiny"))


def encoder(tokenizer, template: str | None, fmt="tokenizer", **data):
    tokenizer._tokenizer.chat_template = (TEMPLATES / f"{template}.jinja").read_text() if template else None
    settings = dict(mask_prompt=True, train_on="all_assistant", reasoning="keep", mask_mismatch="error")
    return Conversations(tokenizer, fmt, OmegaConf.create({**settings, **data}))


def targets(tokenizer, rows) -> list[str]:
    return [tokenizer._tokenizer.decode(ids[s:e]) for ids, spans in rows for s, e in spans]


def never_trained(tokenizer, rows, messages) -> None:
    """No user, system or tool text is ever inside a target, and every row decodes whole."""
    for text in targets(tokenizer, rows):
        for m in messages:
            if m["role"] != "assistant" and len(m["content"]) > 3:
                assert m["content"] not in text, (m, text)


CASES = [  # (template, conversation, tools, the target texts, one per assistant turn)
    ("deepseek_r1", SINGLE, None, ["add two and two\n</think>\n\nIt is 4.<｜end▁of▁sentence｜>"]),
    ("qwen3", SINGLE, None, ["add two and two\n</think>\n\nIt is 4.<|im_end|>\n"]),
    ("qwen3", MULTI, None, ["add two and two\n</think>\n\nIt is 4.<|im_end|>\n",
                            "add three and three\n</think>\n\nIt is 6.<|im_end|>\n"]),
    ("qwen3", TOOLS, WEATHER, ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
                               "<|im_end|>\n", "It is sunny in Paris.<|im_end|>\n"]),
    ("llama31", TOOLS, WEATHER, ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                                 "It is sunny in Paris.<|eot_id|>"]),
    ("llama31", PLAIN, None, ["The treble clef.<|eot_id|>", "The bass clef.<|eot_id|>"]),
    ("qwen25", PLAIN, None, ["The treble clef.<|im_end|>\n", "The bass clef.<|im_end|>\n"]),
]


@pytest.mark.parametrize("template,messages,tools,want", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_every_assistant_turn_trains_exactly_its_own_text(tokenizer, template, messages, tools, want):
    chats = encoder(tokenizer, template)
    rows = chats.rows(messages, tools, "t.jsonl:1")
    assert targets(tokenizer, rows) == want
    never_trained(tokenizer, rows, messages)
    # the prompt of each row is what the model is prompted with at inference, token for token
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids, spans = rows[0]
    assert ids[:spans[0][0]] == chats.prompt_ids(messages[:first], tools)[:spans[0][0]]


def test_rows_share_a_prefix_stable_template_and_split_where_history_is_rendered_differently(tokenizer):
    """Llama 3.1 renders history as it rendered the turn: one row, two targets. Qwen3 strips the reasoning of
    earlier turns from later prompts: two rows, each turn in the prompt it is generated after."""
    rows = encoder(tokenizer, "llama31").rows(PLAIN, None, "t:1")
    assert len(rows) == 1 and len(rows[0][1]) == 2
    chats = encoder(tokenizer, "qwen3")
    rows = chats.rows(MULTI, None, "t:1")
    assert len(rows) == 2 and [len(spans) for _, spans in rows] == [1, 1]
    second = tokenizer._tokenizer.decode(rows[1][0])
    assert "add two and two" not in second and "It is 4." in second  # history as the template renders it
    assert any("2 rows" in n for n in chats.stats.notes("train", True))


def test_reasoning_a_template_drops_is_kept_after_the_generation_prompt_or_left_out_on_request(tokenizer):
    chats = encoder(tokenizer, "deepseek_r1")
    (ids, spans), = chats.rows(SINGLE, None, "t:1")
    text = tokenizer._tokenizer.decode(ids)
    assert text.endswith("<｜Assistant｜><think>\nadd two and two\n</think>\n\nIt is 4.<｜end▁of▁sentence｜>")
    assert "the chat template drops it from 1" in chats.stats.notes("train", True)[0]
    drop = encoder(tokenizer, "deepseek_r1", reasoning="drop")
    rows = drop.rows(SINGLE, None, "t:1")
    assert targets(tokenizer, rows) == ["It is 4.<｜end▁of▁sentence｜>"]
    assert "left out (data.reasoning=drop)" in drop.stats.notes("train", False)[0]


def test_last_assistant_only_and_no_mask(tokenizer):
    rows = encoder(tokenizer, "llama31", train_on="last_assistant").rows(PLAIN, None, "t:1")
    assert targets(tokenizer, rows) == ["The bass clef.<|eot_id|>"]
    rows = encoder(tokenizer, "llama31", mask_prompt=False).rows(PLAIN, None, "t:1")
    (ids, spans), = rows
    assert spans == ((0, len(ids)),)


def test_built_in_formats_mask_every_assistant_turn(tokenizer):
    for fmt, end in (("chatml", "<|im_end|>\n"), ("llama3", "<|eot_id|>"), ("gemma", "<end_of_turn>\n")):
        rows = encoder(tokenizer, None, fmt=fmt).rows(PLAIN, None, "t:1")
        assert targets(tokenizer, rows) == ["The treble clef." + end, "The bass clef." + end], fmt


def test_loss_mask_positions_of_a_multi_turn_chat_with_tools(tokenizer):
    """collate marks exactly the target tokens (mask position p predicts token p + 1)."""
    from tuning_fork.data import collate

    (ids, spans), = encoder(tokenizer, "llama31").rows(TOOLS, WEATHER, "t:1")
    _, mask = collate([(ids, spans)], 4096)
    predicted = np.flatnonzero(np.array(mask[0])) + 1
    assert predicted.tolist() == [t for s, e in spans for t in range(s, e)]
    assert tokenizer._tokenizer.decode([ids[t] for t in predicted]) == "".join(targets(tokenizer, [(ids, spans)]))


UPPER = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
         "{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_without_mask_prompt_a_rewriting_template_trains_on_its_whole_rendering(tokenizer):
    """No mask, nothing to cut out: the template's own rendering trains whole, as mlx-lm trains it."""
    tokenizer._tokenizer.chat_template = UPPER
    chats = Conversations(tokenizer, "tokenizer", OmegaConf.create({"mask_prompt": False}))
    (ids, spans), = chats.rows(PLAIN, None, "t.jsonl:3")
    assert spans == ((0, len(ids)),) and "THE BASS CLEF." in tokenizer._tokenizer.decode(ids)


def test_a_template_that_rewrites_the_answer_is_refused_or_skipped(tokenizer):
    tokenizer._tokenizer.chat_template = UPPER
    chats = Conversations(tokenizer, "tokenizer", OmegaConf.create({"mask_prompt": True}))
    with pytest.raises(MaskError) as e:
        chats.rows(PLAIN, None, "t.jsonl:3")
    assert str(e.value).startswith("t.jsonl:3: assistant turn 1: the chat template rewrites the answer")
    assert "data.mask_mismatch=skip" in str(e.value) and "\n" not in str(e.value)
    skip = Conversations(tokenizer, "tokenizer", OmegaConf.create({"mask_prompt": True, "mask_mismatch": "skip"}))
    assert skip.rows(PLAIN, None, "t.jsonl:3") == []
    assert "1 records skipped (data.mask_mismatch=skip), first at t.jsonl:3" in skip.stats.notes("train", True)[0]


def test_a_tokenizer_merge_across_the_prompts_end_is_refused(tokenizer):
    """A generation prompt that ends inside a word: the tokenizer joins its end and the answer's start."""
    tokenizer._tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] }}"
                                          "{% else %}{{ ' A: tun' + m['content'] + '.' }}{% endif %}{% endfor %}"
                                          "{% if add_generation_prompt %}{{ ' A: tun' }}{% endif %}")
    chats = Conversations(tokenizer, "tokenizer", OmegaConf.create({"mask_prompt": True}))
    with pytest.raises(MaskError, match="the tokenizer merges the text either side of"):
        chats.rows([{"role": "user", "content": "x"}, {"role": "assistant", "content": "ing fork"}], None, "t:1")


def reasoner(tmp_path, template: str) -> Path:
    import shutil

    from tuning_fork.models import resolve

    model = tmp_path / "reasoner"
    shutil.copytree(resolve("tiny"), model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


def test_a_reasoning_models_records_train_with_their_reasoning_and_the_header_says_so(tmp_path, capsys):
    """The case of the issue: DeepSeek-R1's template, single-turn records whose answers carry reasoning."""
    from tuning_fork.train import train

    model = reasoner(tmp_path, (TEMPLATES / "deepseek_r1.jinja").read_text())
    folder = make_data(tmp_path / "d")
    for name in ("train", "valid"):
        records = [json.loads(x) for x in (folder / f"{name}.jsonl").read_text().splitlines()]
        for rec in records:
            rec["messages"][1]["content"] = "<think>one more</think>\n\n" + rec["messages"][1]["content"]
        write_jsonl(folder / f"{name}.jsonl", records)
    train(compose_cfg("data=jsonl", f"data.path={folder}", f"model.path={model}", "data.mask_prompt=true",
                      "debug=fast", f"output_dir={tmp_path / 'run'}"))
    out = capsys.readouterr().out
    assert "reasoning in 24 assistant turns: trained as target; the chat template drops it from 24" in out


def test_a_template_that_rewrites_answers_is_one_line_naming_file_and_line(tmp_path):
    from tuning_fork.errors import TuningForkError
    from tuning_fork.train import train

    model = reasoner(tmp_path, UPPER)
    folder = make_data(tmp_path / "d")
    with pytest.raises(TuningForkError) as e:
        train(compose_cfg("data=jsonl", f"data.path={folder}", f"model.path={model}", "data.mask_prompt=true",
                          "debug=fast", f"output_dir={tmp_path / 'run'}"))
    assert "train.jsonl:1: assistant turn 1: the chat template rewrites the answer" in str(e.value)
    assert not (tmp_path / "run" / "adapters").exists()
