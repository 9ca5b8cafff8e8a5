"""Composition: every option of every group composes; typos and bad values fail before any model loads."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tuning_fork import config
from tuning_fork.errors import ConfigError

from .conftest import ROOT, compose_cfg, make_data, run_cli

CONF = ROOT / "tuning_fork" / "conf"
GROUPS = ["model", "data", "schedule", "adapter", "prompt"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_its_required_options():
    have = {(g, o) for g, o in OPTIONS}
    for need in [("model", m) for m in ("tiny", "mistral", "llama3", "qwen", "gemma", "phi")] + \
            [("data", d) for d in ("demo", "jsonl", "hf")] + [("schedule", "default"), ("schedule", "epochs3")] + \
            [("adapter", a) for a in ("lora", "dora", "full", "qlora")] + \
            [("prompt", p) for p in ("tokenizer", "chatml", "llama3", "mistral", "alpaca", "phi", "gemma")]:
        assert need in have


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_composes_and_resolves(group, option, tmp_path):
    if (group, option) == ("data", "hf"):
        pytest.importorskip("datasets")  # the hf extra (in dev); a local copy stands in for the hub
    extra = [f"data.path={make_data(tmp_path / 'd')}"] if (group, option) in (("data", "jsonl"), ("data", "hf")) else []
    cfg = compose_cfg(f"{group}={option}", *extra)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert set(GROUPS) <= set(resolved)
    config.check(cfg)


def test_hf_option_composes():
    cfg = compose_cfg("data=hf", "data.path=org/some-set", "schedule.iters=10")
    assert cfg.data.source == "hf" and cfg.schedule.iters == 10


def test_defaults_are_the_demo():
    cfg = compose_cfg()
    assert (cfg.model.path, cfg.data.source, cfg.adapter.type, cfg.prompt.format) == ("tiny", "demo", "lora", "tokenizer")
    assert cfg.schedule.learning_rate == 1e-3  # the tiny model brings its recipe ...
    assert compose_cfg("model=mistral").schedule.learning_rate == 1e-5  # ... a real model does not get it
    assert compose_cfg("schedule=epochs3").schedule.epochs == 3  # and an explicit schedule wins


def test_overrides_as_in_the_brief():
    cfg = compose_cfg("model=mistral", "schedule=epochs3", "adapter.rank=16")
    assert cfg.model.path.startswith("mlx-community/Mistral")
    assert cfg.schedule.epochs == 3 and cfg.adapter.rank == 16


@pytest.mark.parametrize("override,message", [
    ("adapter.rnak=4", "rnak"),
    ("adapter.rank=abc", "adapter.rank"),
    ("model=nope", "model/nope"),
    ("schedule.batchsize=2", "batchsize"),
])
def test_typos_and_wrong_types_fail_at_composition(override, message):
    with pytest.raises(Exception) as e:
        compose_cfg(override)
    assert message in str(e.value)


@pytest.mark.parametrize("override,choices", [
    ("schedule.optimizer=adamm", "[adam, adamw, sgd, adafactor, muon]"),
    ("adapter.type=loraa", "[lora, dora, full, qlora]"),
    ("data.too_long=cut", "[truncate, drop, error]"),
    ("data.source=csv", "[demo, jsonl, hf]"),
    ("prompt.format=vicuna", "[tokenizer, chatml, llama3, mistral, alpaca, phi, gemma]"),
])
def test_a_fixed_choice_mistyped_fails_at_composition_listing_the_choices(override, choices):
    with pytest.raises(Exception) as e:
        compose_cfg(override)
    assert f"expected one of {choices}" in str(e.value.__cause__)


@pytest.mark.parametrize("override,key", [
    ("schedule.batch_size=0", "schedule.batch_size"),
    ("schedule.epochs=0", "schedule.epochs"),
    ("schedule.epochs=null,schedule.iters=0", "schedule.iters"),
    ("adapter.rank=0", "adapter.rank"),
    ("adapter.dropout=1.5", "adapter.dropout"),
])
def test_range_checks_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.check(compose_cfg(*override.split(",")))


def test_help_lists_groups_and_options():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for g in GROUPS:
        assert f"{g}:" in proc.stdout
    assert "mistral" in proc.stdout and "epochs3" in proc.stdout and "qlora" in proc.stdout


def test_cfg_job_is_fast_and_imports_nothing_heavy():
    code = ("import sys; sys.argv = ['tuning_fork', 'model=mistral', 'schedule=epochs3', '--cfg', 'job', '--resolve']\n"
            "from tuning_fork.__main__ import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('mlx.core', 'mlx_lm', 'transformers', 'wandb', 'optuna', 'ogbujipt') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    assert "epochs: 3" in proc.stdout
