"""Benchmark tasks through lm-evaluation-harness: the app on a run (before and after), in training (a sweep's
metric), as a pipeline stage, and its mistakes."""

import json

import pytest

from .conftest import make_data, one_line_error, read_metrics, run_cli, write_jsonl

pytestmark = pytest.mark.slow
pytest.importorskip("lm_eval")

TASK = """task: plus_one
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A local multiple-choice task in the harness's YAML: the right sum or a wrong one."""
    folder = tmp_path_factory.mktemp("tasks")
    write_jsonl(folder / "mc.jsonl", [{"question": f"What is {i} plus one?",
                                       "choices": [f"{i} plus one is {i + 1}.", f"{i} plus one is {i + 7}."],
                                       "answer": 0} for i in range(10)])
    (folder / "plus_one.yaml").write_text(TASK.format(data=folder / "mc.jsonl"))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "d", n_train=20, n_valid=4)


def test_the_app_scores_a_run_and_its_base(tasks, data, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli("data=jsonl", f"data.path={data}", "debug=fast", f"hydra.run.dir={run_dir}").returncode == 0
    proc = run_cli(f"run={run_dir}", f"eval.include_path={tasks}", "eval.tasks=[plus_one]", "eval.limit=6",
                   module="tuning_fork.evaluate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "eval" / "results.json").read_text())  # the harness's own results dict
    acc = results["results"]["plus_one"]["acc,none"]
    assert 0 <= acc <= 1 and results["n-samples"]["plus_one"]["effective"] == 6
    baseline = json.loads((run_dir / "eval" / "baseline.json").read_text())
    assert "acc,none" in baseline["results"]["plus_one"]
    last = read_metrics(run_dir)[-1]
    assert last["eval/plus_one/acc"] == acc and "base_eval/plus_one/acc" in last
    assert "plus_one/acc" in proc.stdout and "fine-tuned" in proc.stdout


def test_training_with_tasks_returns_their_scores_for_a_sweep(tasks, data, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("data=jsonl", f"data.path={data}", "debug=fast", f"hydra.run.dir={run_dir}",
                   f"eval.include_path={tasks}", "eval.tasks=[plus_one]", "optimized_metric=eval/plus_one/acc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "results.json").read_text())
    assert 0 <= result["eval/plus_one/acc"] <= 1
    assert (run_dir / "eval" / "results.json").exists()
    assert any("eval/plus_one/acc" in m for m in read_metrics(run_dir))


def test_the_eval_pipeline_trains_then_scores_once(tasks, data, tmp_path):
    proc = run_cli("pipeline=sft_eval", "data=jsonl", f"data.path={data}", "debug=fast", f"hydra.run.dir={tmp_path / 'p'}",
                   f"eval.include_path={tasks}", "eval.tasks=[plus_one]", "eval.limit=4", "eval.baseline=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "p" / "sft" / "eval" / "results.json").exists()  # scored in the eval stage, on sft's run
    assert "eval/plus_one/acc" not in json.loads((tmp_path / "p" / "sft" / "results.json").read_text())


def test_evaluation_mistakes_are_one_line_errors(tasks, data, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli("data=jsonl", f"data.path={data}", "debug=fast", f"hydra.run.dir={run_dir}").returncode == 0
    one_line_error(run_cli(f"run={run_dir}", module="tuning_fork.evaluate"), "eval.tasks is empty")
    one_line_error(run_cli(f"run={run_dir}", "eval.tasks=[no_such_task_here]", f"eval.include_path={tasks}",
                           module="tuning_fork.evaluate"), "unknown task 'no_such_task_here'")
    one_line_error(run_cli(f"run={run_dir}", "eval.tasks=[plus_one]", f"eval.include_path={tmp_path / 'none'}",
                           module="tuning_fork.evaluate"), "eval.include_path=")
