"""From run to use: the exports (mlx, quantized, hf, gguf) and what reads them, the model card, pushing with no
network, the server on loopback, and the pipeline stage."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import ROOT, compose_app, make_data, one_line_error, run_cli

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "What is 7 plus one?"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained run in chatml (not the tokenizer's template), for the exports to carry its format."""
    tmp = tmp_path_factory.mktemp("export")
    data = make_data(tmp / "d", n_train=20, n_valid=4)
    run_dir = tmp / "run"
    proc = run_cli("data=jsonl", f"data.path={data}", "prompt=chatml", "schedule.iters=12", "schedule.epochs=null",
                   "schedule.batch_size=4", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def greedy(model, tokenizer, n=24) -> str:
    from mlx_lm import generate

    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    return generate(model, tokenizer, prompt, max_tokens=n)


def run_model(run_dir):
    """The run's model with its best adapters, as tuning_fork.generate loads it."""
    from tuning_fork.generate import choose_model, load_model
    cfg = compose_app("generate", f"run={run_dir}")
    base, adapters, adapter_config, fmt = choose_model(cfg)
    model, tokenizer = load_model(cfg, base, adapters, adapter_config)
    from tuning_fork.prompts import JINJA

    if fmt != "tokenizer":
        tokenizer._tokenizer.chat_template = JINJA[fmt]
    return model, tokenizer


def test_the_mlx_export_generates_what_the_run_with_its_adapters_does(run):
    from mlx_lm import load

    proc = run_cli("--help", module="tuning_fork.export")
    assert proc.returncode == 0 and "format=mlx|hf|gguf" in proc.stdout
    proc = run_cli(f"run={run}", module="tuning_fork.export")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = run / "export" / "mlx"
    assert f"exported mlx to {out}" in proc.stdout
    model, tokenizer = load(str(out))
    text = greedy(model, tokenizer)
    assert text and text == greedy(*run_model(run))
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()  # the run's prompt format travels with it
    card = (out / "README.md").read_text()
    assert "library_name: mlx" in card and "**Base model:** `tiny`" in card and "best_val_loss" in card
    assert "prompt:\n  format: chatml" in card  # the training config
    # a second export to the same place is refused, and what is there stays as it was
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    one_line_error(run_cli(f"run={run}", module="tuning_fork.export"), f"out={out} exists", "overwrite=true")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_a_quantized_mlx_export_loads_and_is_smaller(run):
    from mlx_lm import load

    proc = run_cli(f"run={run}", "quantize.bits=4", "quantize.group_size=32", module="tuning_fork.export")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = run / "export" / "mlx-4bit"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    full = run / "export" / "mlx"
    if full.exists():
        assert size(out) < size(full)
    model, tokenizer = load(str(out))
    assert greedy(model, tokenizer, 4) is not None


def test_the_hf_export_loads_in_transformers_with_the_same_logits(run, tmp_path):
    torch = pytest.importorskip("torch")
    import mlx.core as mx
    import numpy as np
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    proc = run_cli(f"run={run}", "format=hf", f"out={out}", module="tuning_fork.export")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "library_name: transformers" in (out / "README.md").read_text()
    model, tokenizer = run_model(run)
    ids = tokenizer.encode("What is 7 plus one? 7 plus one is 8.")
    ours = np.array(model(mx.array([ids])).astype(mx.float32))
    hf = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-3 * max(1.0, np.abs(ours).max())


def test_the_gguf_export_names_its_architecture_and_tensors(run, tmp_path):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "gguf"
    proc = run_cli(f"run={run}", "format=gguf", f"out={out}", module="tuning_fork.export")
    assert proc.returncode == 0, proc.stderr[-2000:]
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"} <= names
    assert not list(out.glob("*.safetensors"))  # the GGUF file is the model


def test_export_mistakes_are_one_line_errors(run, tmp_path):
    one_line_error(run_cli(f"run={run}", "format=hf", "quantize.bits=4", f"out={tmp_path / 'x'}",
                           module="tuning_fork.export"), "quantize.bits=4 with format=hf")
    one_line_error(run_cli(f"run={tmp_path}", module="tuning_fork.export"), f"run={tmp_path}")
    one_line_error(run_cli(module="tuning_fork.export"), "run= is not set")
    assert not (tmp_path / "x").exists()


def test_gguf_for_an_architecture_mlx_lm_cannot_write_names_the_hf_route(tmp_path):
    from tuning_fork import models
    from tuning_fork.errors import ConfigError
    from tuning_fork.export import check_request

    base = tmp_path / "qwen"
    base.mkdir()
    config = json.loads((Path(models.resolve("tiny")) / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "qwen3"}))
    with pytest.raises(ConfigError, match="supports llama, mistral, mixtral, not qwen3: export format=hf"):
        check_request(compose_app("export", "format=gguf", "run=x"), str(base))


def test_push_with_no_network_is_one_line_and_the_export_stays_whole(run, tmp_path):
    out = tmp_path / "pushed"
    proc = run_cli(f"run={run}", f"out={out}", "push.repo=someone/tiny-test", module="tuning_fork.export",
                   env={"HF_HUB_OFFLINE": "1"})
    one_line_error(proc, "push.repo=someone/tiny-test", "the upload failed", f"whole in {out}")
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()


def test_the_sft_export_pipeline_trains_then_exports(tmp_path):
    data = make_data(tmp_path / "d", n_train=12, n_valid=4)
    proc = run_cli("pipeline=sft_export", "data=jsonl", f"data.path={data}", "debug=fast",
                   f"hydra.run.dir={tmp_path / 'p'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "p" / "export" / "config.json").exists()
    assert (tmp_path / "p" / "sft" / "results.json").exists()


# ------------------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_server_answers_a_chat_request_on_loopback(run):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tuning_fork.serve", f"run={run}", f"port={port}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        body = json.dumps({"messages": PROMPT, "max_tokens": 6, "temperature": 0}).encode()
        deadline, answer = time.time() + 90, None
        while time.time() < deadline and answer is None:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
            except OSError:
                time.sleep(0.5)
        assert answer is not None, "the server never answered"
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["usage"]["completion_tokens"] >= 1
        # the run's format (chatml) is the server's template: the prompt it counted is chatml's rendering
        from tuning_fork import models
        from tuning_fork.prompts import render

        tokenizer = models.load_tokenizer(models.resolve("tiny"))
        assert answer["usage"]["prompt_tokens"] == len(tokenizer.encode(render("chatml", PROMPT),
                                                                         add_special_tokens=False))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("fmt", ["chatml", "llama3", "mistral", "alpaca", "phi", "gemma"])
def test_each_prompt_format_as_a_chat_template_renders_as_the_format_does(fmt):
    from tuning_fork import models
    from tuning_fork.prompts import JINJA, render

    hf = models.load_tokenizer(models.resolve("tiny"))._tokenizer
    hf.chat_template = JINJA[fmt]
    for conv in ([{"role": "user", "content": " Hi "}, {"role": "assistant", "content": " Hello! "}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                  {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
                 [{"role": "system", "content": ""}, {"role": "user", "content": "x"}]):
        for generation in (True, False):
            assert hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=generation) == \
                render(fmt, conv, generation)


def test_a_qlora_run_exports_de_quantized_for_transformers_and_quantized_for_mlx(tmp_path):
    """The base was quantized at load (QLoRA): format=hf writes full-precision weights and no quantization;
    format=mlx keeps the base's 4 bits and says so in its config (mlx_lm.load reads it)."""
    from mlx_lm import load

    data = make_data(tmp_path / "d", n_train=12, n_valid=4)
    run_dir = tmp_path / "run"
    proc = run_cli("data=jsonl", f"data.path={data}", "adapter=qlora", "debug=fast", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for fmt in ("hf", "mlx"):
        proc = run_cli(f"run={run_dir}", f"format={fmt}", module="tuning_fork.export")
        assert proc.returncode == 0, proc.stderr[-2000:]
    hf = json.loads((run_dir / "export" / "hf" / "config.json").read_text())
    assert "quantization" not in hf and "quantization_config" not in hf
    from safetensors.numpy import load_file

    weights = load_file(str(run_dir / "export" / "hf" / "model.safetensors"))
    assert not any(k.endswith((".scales", ".biases")) for k in weights)
    assert json.loads((run_dir / "export" / "mlx" / "config.json").read_text())["quantization"]["bits"] == 4
    # fusing into 4-bit weights rounds them to 4 bits once more (as mlx_lm fuse does): close to the run, not
    # equal (the built-in model's random weights round badly: ~12% of the logits' size here)
    import mlx.core as mx
    import numpy as np

    model, tokenizer = load(str(run_dir / "export" / "mlx"))
    run, _ = run_model(run_dir)
    ids = mx.array([tokenizer.encode("What is 7 plus one? 7 plus one is 8.")])
    ours, theirs = np.array(model(ids).astype(mx.float32)), np.array(run(ids).astype(mx.float32))
    assert np.abs(ours - theirs).mean() < 0.25 * np.abs(theirs).mean()
