"""Generation: the six prompt formats as their official templates render them, Word Loom, few-shot,
sampling options, colour by probability, and answering a trained question after the demo."""

import json
import re

import pytest

from tuning_fork.prompts import PromptError, parse_markers, render

from .conftest import run_cli

SYSTEM, USER = "Be brief.", "Hi there"
# What each family's official chat template renders for [system, user] with the generation prompt.
OFFICIAL = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Be brief.\n\nHi there[/INST]",
    "alpaca": "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\n",
    "phi": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n",
    "gemma": "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n",
}


def gen(*args, **kw):
    return run_cli(*args, module="tuning_fork.generate", **kw)


@pytest.mark.parametrize("fmt", sorted(OFFICIAL))
def test_prompt_only_prints_the_official_template(fmt):
    proc = gen(f"prompt={fmt}", f"prompt.system={SYSTEM}", f"prompt.text={USER}", "prompt_only=true")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == OFFICIAL[fmt] + "\n"


def test_multi_turn_training_renders():
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"}]
    assert render("mistral", conv, False) == "<s>[INST] Q1[/INST] A1</s>[INST] S\n\nQ2[/INST] A2</s>"
    assert render("gemma", conv, False) == ("<bos><start_of_turn>user\nS\n\nQ1<end_of_turn>\n<start_of_turn>model\n"
                                            "A1<end_of_turn>\n<start_of_turn>user\nQ2<end_of_turn>\n"
                                            "<start_of_turn>model\nA2<end_of_turn>\n")
    assert render("phi", conv[1:3], False) == "<|user|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n<|endoftext|>"
    assert render("alpaca", conv[1:3], False).startswith("Below is an instruction")
    # the prompt part of a record is a prefix of the whole record: completion-only masks line up
    for fmt in OFFICIAL:
        assert render(fmt, conv, False).startswith(render(fmt, conv[:-1], True)), fmt


def test_tokenizer_format_uses_the_models_template():
    proc = gen("prompt=tokenizer", f"prompt.system={SYSTEM}", f"prompt.text={USER}", "prompt_only=true")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == OFFICIAL["chatml"] + "\n"  # the tiny model's template is ChatML


LOOM = '''lang = "en"
[system_prompt_final]
text = """You are a medical professional.  If you cannot provide an answer based on the given context, please let me know."""

[context]
text = """Lymphoid aggregates are a collection of B cells, T cells, and supporting cells, present within the stroma of various organs"""

[templated_question_final]
text = """The patient has {medical_problems}.  Summarize the patient's problems"""

[question]
_ = "What is {thing}?"
'''
MEDICAL = ("<|im_start|>system\nYou are a medical professional.  If you cannot provide an answer based on the given "
           "context, please let me know.\n\nLymphoid aggregates are a collection of B cells, T cells, and supporting "
           "cells, present within the stroma of various organs<|im_end|>\n<|im_start|>user\nThe patient has Lymphoid "
           "aggregate.  Summarize the patient's problems<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture
def loom(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "loom.toml").write_text(LOOM)
    (folder / "notes.txt").write_text("Notes: the biopsy was benign.")
    (tmp_path / "secret.txt").write_text("outside")
    return folder / "loom.toml"


@pytest.mark.parametrize("sections, markers", [
    ("system_prompt_final context templated_question_final",  # the README's medical example, as a string
     "prompt.loom_markers='medical_problems=[Lymphoid aggregate]'"),
    ("[system_prompt_final,context,templated_question_final]",  # sections as a list, markers as a mapping
     "+prompt.loom_markers.medical_problems='Lymphoid aggregate'"),
])
def test_readme_medical_example(loom, sections, markers):
    proc = gen("prompt=chatml", f"prompt.loom_file={loom}", f"prompt.build_prompt={sections}", markers,
               "prompt_only=true")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == MEDICAL + "\n"


def test_file_sections_and_default_sections(loom):
    proc = gen("prompt=chatml", f"prompt.loom_file={loom}", "prompt.build_prompt='[notes.txt] question'",
               "prompt.loom_markers='thing=[a = b]'", "prompt_only=true")
    assert proc.returncode == 0, proc.stderr
    assert "system\nNotes: the biopsy was benign.<|im_end|>" in proc.stdout
    assert "user\nWhat is a = b?<|im_end|>" in proc.stdout
    # no build_prompt: system_prompt/context/question where present (here: context, question)
    proc = gen("prompt=chatml", f"prompt.loom_file={loom}", "prompt.loom_markers='thing=[x]'", "prompt_only=true")
    assert proc.returncode == 0, proc.stderr
    assert "user\nWhat is x?" in proc.stdout and "Lymphoid aggregates" in proc.stdout


@pytest.mark.parametrize("args,needle", [
    (["prompt.build_prompt=nosuch"], "no section [nosuch]"),
    (["prompt.build_prompt=templated_question_final"], "{medical_problems}"),
    (["prompt.build_prompt='[missing.txt] question'", "prompt.loom_markers='thing=[x]'"], "missing.txt"),
    (["prompt.build_prompt='[../secret.txt] question'", "prompt.loom_markers='thing=[x]'"], "outside"),
    (["prompt.loom_markers='no brackets'"], "loom_markers"),
])
def test_loom_errors_are_one_line(loom, args, needle):
    proc = gen("prompt=chatml", f"prompt.loom_file={loom}", *args, "prompt_only=true")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1]


def test_outside_files_when_allowed(loom):
    proc = gen("prompt=chatml", f"prompt.loom_file={loom}", "prompt.build_prompt='[../secret.txt] question'",
               "prompt.loom_markers='thing=[x]'", "prompt.allow_outside_files=true", "prompt_only=true")
    assert proc.returncode == 0 and "system\noutside<|im_end|>" in proc.stdout


def test_unreadable_loom_file(tmp_path):
    proc = gen(f"prompt.loom_file={tmp_path}/none.toml", "prompt_only=true")
    assert proc.returncode == 2 and "none.toml" in proc.stderr and "Traceback" not in proc.stderr


def test_marker_string_parser():
    assert parse_markers("a=[x] b=[two words = three]") == {"a": "x", "b": "two words = three"}
    assert parse_markers({"a": 1}) == {"a": "1"}
    with pytest.raises(PromptError):
        parse_markers("a=x")


def test_few_shot_turns_come_before_the_user_turn(tmp_path):
    shots = tmp_path / "shots.json"
    shots.write_text(json.dumps([{"role": "user", "content": "Q0"}, {"role": "assistant", "content": "A0"}]))
    proc = gen("prompt=llama3", "prompt.system=S", "prompt.text=Q1", f"cot_source={shots}", "prompt_only=true")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.index("system") < out.index("Q0") < out.index("A0") < out.index("Q1")
    assert out.rstrip("\n").endswith("<|start_header_id|>assistant<|end_header_id|>")
    proc = gen("prompt=tokenizer", "prompt.text=Q1", f"cot_source={shots}", "prompt_only=true")
    assert proc.stdout.startswith("<|im_start|>user\nQ0<|im_end|>\n<|im_start|>assistant\nA0<|im_end|>")


@pytest.mark.slow
def test_sampling_options_colour_and_seed():
    args = ["model=tiny", "prompt.text=Hello", "num_tokens=12", "temperature=0.7", "top_p=0.9", "min_p=0.05",
            "repetition_penalty=1.2", "seed=1", "colorize=true"]
    a, b = gen(*args), gen(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout  # the same seed gives the same text
    assert "\033[" in a.stdout and "probability:" in a.stdout  # colours, also when piped
    assert "tokens/s" in a.stderr and "peak memory" in a.stderr
    c = gen(*args[:-2], "seed=2", "colorize=true")
    assert c.stdout != a.stdout


def test_run_folder_must_hold_adapters(tmp_path):
    proc = gen(f"run={tmp_path}", "prompt.text=x")
    assert proc.returncode == 2 and "adapter_config.json" in proc.stderr


@pytest.mark.slow
def test_colour_keeps_spaces_and_multibyte_characters():
    from mlx_lm.utils import load_tokenizer

    from tuning_fork.generate import Colourizer
    from tuning_fork.models import tiny_model_path

    tokenizer = load_tokenizer(tiny_model_path())
    text = "Größe: 440 Hz — ♩ = 60, naïve café ✓"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 10
    colour = Colourizer(tokenizer)
    out = "".join(colour.add(t, p) for t, p in zip(ids, [0.9, 0.1, 0.5] * len(ids))) + colour.flush()
    assert re.sub(r"\033\[[0-9;]*m", "", out) == text
    assert "\033[32m" in out and "\033[31m" in out
