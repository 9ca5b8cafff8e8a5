"""Composition: every option of every group composes; typos and bad values fail before any model loads."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tuning_fork import config
from tuning_fork.errors import ConfigError

from .conftest import ROOT, compose_cfg, make_data, run_cli

CONF = ROOT / "conf"
GROUPS = ["model", "data", "schedule", "adapter", "prompt"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_its_required_options():
    have = {(g, o) for g, o in OPTIONS}
    for need in [("model", m) for m in ("tiny", "mistral", "llama3", "qwen", "gemma", "phi")] + \
            [("data", d) for d in ("demo", "jsonl", "hf", "mix", "demo_mix")] + [("schedule", "default"), ("schedule", "epochs3")] + \
            [("adapter", a) for a in ("lora", "dora", "full", "qlora")] + \
            [("prompt", p) for p in ("tokenizer", "chatml", "llama3", "mistral", "alpaca", "phi", "gemma")]:
        assert need in have


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_composes_and_resolves(group, option, tmp_path):
    if (group, option) == ("data", "hf"):
        pytest.importorskip("datasets")  # the hf extra (in dev); a local copy stands in for the hub
    extra = [f"data.path={make_data(tmp_path / 'd')}"] if (group, option) in (("data", "jsonl"), ("data", "hf")) else []
    if (group, option) == ("data", "mix"):
        extra = [f"data.sources.one.path={make_data(tmp_path / 'd')}"]
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
    ("data.source=csv", "[demo, jsonl, hf, mix]"),
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
    ("schedule.grad_checkpoint=true,schedule.checkpoint_layers=0", "schedule.checkpoint_layers"),
    ("schedule.checkpoint_part=mlp", "schedule.checkpoint_part"),  # (without grad_checkpoint it would do nothing)
    ("schedule.checkpoint_layers=4", "schedule.checkpoint_layers"),
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


@pytest.mark.slow
def test_model_path_just_works_with_the_default_schedule_and_adapter(tmp_path):
    """A model folder of the user's: no schedule or adapter chosen, and neither the tiny model's learning
    rate, epochs nor LoRA rank comes along."""
    import json
    import shutil

    from tuning_fork.models import resolve
    from tuning_fork.train import train

    model = tmp_path / "my-model"
    shutil.copytree(resolve("tiny"), model)
    data = make_data(tmp_path / "d")
    result = train(compose_cfg("data=jsonl", f"data.path={data}", f"model.path={model}",
                               f"output_dir={tmp_path / 'run'}"))
    saved = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert saved.schedule.learning_rate == 1e-5 and saved.schedule.batch_size == 4
    assert saved.schedule.iters == 6  # one epoch of 24 records: schedule=default's plan
    assert saved.adapter.rank == 16 and saved.adapter.alpha == 32
    assert json.loads((tmp_path / "run" / "adapters" / "adapter_config.json").read_text())["model"] == str(model)
    assert result["iters"] == 6
    tiny = compose_cfg()
    assert tiny.schedule.learning_rate == 1e-3 and tiny.schedule.epochs == 55 and tiny.adapter.rank == 32


def test_experiments_and_the_debug_preset_compose():
    for name in (p.stem for p in (CONF / "experiment").glob("*.yaml")):
        cfg = compose_cfg(f"experiment={name}", "data.path=./d")
        assert cfg.model.path and cfg.schedule.batch_size >= 1
    cfg = compose_cfg("experiment=mistral_lora", "data.path=./d")
    assert cfg.model.path.startswith("mlx-community/Mistral") and cfg.data.mask_prompt and cfg.adapter.rank == 16
    assert cfg.schedule.epochs == 3 and cfg.schedule.early_stopping.patience == 3
    cfg = compose_cfg("experiment=demo")
    assert cfg.model.path == "tiny" and cfg.schedule.made_for == "tiny" and cfg.adapter.rank == 32
    cfg = compose_cfg("debug=fast", "schedule.iters=4")
    assert cfg.schedule.iters == 4 and cfg.schedule.epochs is None


@pytest.mark.slow
def test_a_wheel_ships_the_configs_and_a_projects_conf_composes_on_top(tmp_path):
    """A non-editable install (the wheel, unpacked) composes from another folder, where ./conf of the
    user's project adds its own options."""
    import zipfile

    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(ROOT)],
                   check=True, capture_output=True)
    site = tmp_path / "site"
    with zipfile.ZipFile(next(wheel_dir.glob("*.whl"))) as whl:
        whl.extractall(site)
    assert (site / "tuning_fork" / "conf" / "config.yaml").exists()
    project = tmp_path / "project"
    (project / "conf" / "schedule").mkdir(parents=True)
    (project / "conf" / "schedule" / "mine.yaml").write_text("batch_size: 2\nlearning_rate: 3e-4\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", "import tuning_fork, sys; print(tuning_fork.__file__)"], cwd=project,
                          env=env, capture_output=True, text=True)
    assert proc.stdout.startswith(str(site)), proc.stdout + proc.stderr  # the wheel's copy, not the checkout
    proc = subprocess.run([sys.executable, "-m", "tuning_fork", "schedule=mine", "--cfg", "job"], cwd=project,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "learning_rate: 0.0003" in proc.stdout and "batch_size: 2" in proc.stdout
