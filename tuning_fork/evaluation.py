"""Validation: which records are scored, the loss over them, task metrics from generated answers, and the
best value so far (the best adapter, early stopping).

A partial validation (`schedule.val_batches` below the whole split) scores a fixed sample that represents
the split: the records sorted by length, cut into as many equal strata as the sample has records, one
record drawn from each with the run's seed. The same records are scored at every validation of a run and
in every run with the same seed and batch size, so curves and sweep trials compare; the final validation
scores the whole split as well (`val_loss_full`) unless `schedule.final_validation=sample`.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .tracking import Hook

MAXIMIZED = ("exact_match", "token_f1", "rouge_l",  # task metrics, and preference metrics: higher is better
             "reward_accuracy", "reward_margin", "chosen_reward", "chosen_logp", "reward_mean")
GRPO_METRICS = ("reward_mean", "reward_std", "kl", "clip_ratio", "completion_length", "generation_seconds",
                "completions_per_second")
PREFERENCE_METRICS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp",
                      "rejected_logp")


def validation_sample(lengths: list[int], n: int, seed: int) -> list[int]:
    """Indices of `n` records stratified over length (all of them when n covers the split), sorted."""
    if n >= len(lengths):
        return list(range(len(lengths)))
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    edges = np.linspace(0, len(order), n + 1).astype(int)
    rng = np.random.default_rng([seed, 0x5A17])
    return sorted(order[lo + int(rng.integers(hi - lo))] for lo, hi in zip(edges[:-1], edges[1:]))


def evaluate(model, batches, loss_fn, progress=None, metrics: dict | None = None) -> float:
    """Mean loss per unit of weight (target token, pair) over `batches` (each rank's share of them), summed
    over ranks. The objective's other metrics, weighted alike, go into `metrics` when given."""
    return means(*evaluate_sums(model, batches, loss_fn, progress), metrics)


def evaluate_sums(model, batches, loss_fn, progress=None) -> tuple:
    """(loss × weight, weight, {metric: value × weight}) over `batches`, summed over ranks (floats)."""
    import mlx.core as mx

    from .distributed import stream

    model.eval()
    total, count, sums = mx.array(0.0), mx.array(0.0), {}
    for batch in batches:
        value, weight, aux = loss_fn(model, *batch)
        total, count = total + value * weight, count + weight
        for k, v in aux.items():
            if k != "tokens":
                sums[k] = sums.get(k, 0.0) + v * weight
        mx.eval(total, count, sums)
        if progress is not None:
            progress()
    if mx.distributed.init().size() > 1:
        total, count = (mx.distributed.all_sum(x, stream=stream()) for x in (total, count))
        sums = {k: mx.distributed.all_sum(v, stream=stream()) for k, v in sums.items()}
    model.train()
    return total.item(), count.item(), {k: v.item() for k, v in sums.items()}


def means(total: float, count: float, sums: dict, metrics: dict | None = None) -> float:
    """The mean loss of evaluate_sums' figures (nan with no weight); the metrics' means into `metrics`."""
    if metrics is not None:
        metrics.update({k: v / max(count, 1) for k, v in sums.items()})
    return total / max(count, 1) if count else float("nan")


def direction(metric: str, mode: str = "auto") -> str:
    """'min' or 'max' for a logged metric: task metrics are maximized, losses and perplexities minimized."""
    if mode in ("min", "max"):
        return mode
    if metric.removeprefix("base_").startswith("eval/"):  # the harness's metrics: accuracies, but perplexities
        return "min" if any(w in metric for w in ("perplexity", "bits_per_byte", "ppl")) else "max"
    name = metric.removeprefix("best_").removeprefix("val_").removeprefix("train_")
    return "max" if name in MAXIMIZED or name.startswith("reward/") else "min"


@dataclass
class Best:
    """The best value of the monitored metric, and the validations since it last improved by more than
    min_delta (early stopping's count). Saved with every checkpoint, so a resumed run keeps its patience."""

    metric: str = "val_loss"
    mode: str = "min"
    value: float | None = None
    iteration: int | None = None
    anchor: float | None = None  # the value at the last improvement larger than min_delta
    waited: int = 0  # validations since then

    def update(self, iteration: int, value: float, min_delta: float) -> bool:
        """Take one validation's value; True when it is the best so far (the best adapter is written)."""
        if value is None or not math.isfinite(value):
            self.waited += 1
            return False
        sign = 1 if self.mode == "min" else -1
        improved = self.value is None or sign * (self.value - value) > 0
        if improved:
            self.value, self.iteration = value, iteration
        if self.anchor is None or sign * (self.anchor - value) > min_delta:
            self.anchor, self.waited = value, 0
        else:
            self.waited += 1
        return improved


# ------------------------------------------------------------------------------------------ task metrics
# exact_match and token_f1 as SQuAD defines them (Rajpurkar et al. 2016, the official evaluate-v1.1 script):
# lower-case, drop punctuation and the articles a/an/the, collapse whitespace; F1 over the bag of tokens.


def normalize(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str, _scorer=[]) -> float:
    """ROUGE-L F-measure (Lin 2004), by Google's rouge-score package."""
    if not _scorer:
        from rouge_score import rouge_scorer

        _scorer.append(rouge_scorer.RougeScorer(["rougeL"]))
    return _scorer[0].score(reference, prediction)["rougeL"].fmeasure


SCORERS = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}


class AnswerScorer:
    """At each validation: greedy answers to the prompts of fixed validation records, scored against their
    references (the completion, or the last assistant turn). Each rank answers its share of the records."""

    def __init__(self, cfg, split, tokenizer, rank: int, size: int):
        from .data import generation_prompt, split_parts

        g = cfg.eval.generate
        if split.format == "text":
            raise ConfigError(f"eval.generate.records={g.records}: {split.origin} holds text records, which have no "
                              "prompt to answer: use prompt/completion or chat records, or eval.generate.records=0")
        answerable = [(rec, part) for part in split_parts(split, cfg.data, cfg.prompt) if part.split.format != "text"
                      for rec in part.split.records]  # (a mixture's text sources have no prompt)
        picks = validation_sample([len(str(rec)) for rec, _ in answerable], g.records, cfg.seed)
        self.items = [generation_prompt(answerable[i][0], tokenizer, answerable[i][1].data, answerable[i][1].prompt)
                      for i in picks]
        self.mine = self.items[rank::size]
        self.tokenizer, self.max_tokens, self.metrics = tokenizer, g.max_tokens, list(g.metrics)
        self.samples: list[dict] = []  # the last validation's answers (rank 0's share), for a look

    def __call__(self, model) -> dict:
        from .distributed import all_sum, world

        model.eval()
        totals = dict.fromkeys(self.metrics, 0.0)
        self.samples = []
        for prompt_ids, reference in self.mine:
            answer = self.answer(model, prompt_ids)
            for m in self.metrics:
                totals[m] += SCORERS[m](answer, reference)
            self.samples.append({"answer": answer, "reference": reference})
        model.train()
        group = world()
        n = len(self.items)
        return {f"val_{m}": all_sum(group, totals[m]) / n for m in self.metrics}

    def answer(self, model, prompt_ids: list[int]) -> str:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        eos = set(self.tokenizer.eos_token_ids) if hasattr(self.tokenizer, "eos_token_ids") else {
            self.tokenizer.eos_token_id}
        out = []
        for token, _ in generate_step(mx.array(prompt_ids), model, max_tokens=self.max_tokens,
                                      sampler=lambda logits: mx.argmax(logits, axis=-1)):
            token = int(token)
            if token in eos:
                break
            out.append(token)
        return self.tokenizer.decode(out).strip()


# ------------------------------------------------------------------------------------------- validation


class Validator:
    """Scores the model on the validation split: the loss over the fixed sample (or the whole split), and
    the task metrics of eval.generate when set."""

    def __init__(self, cfg, objective, records, split, tokenizer, val_batches: int, rank: int, size: int):
        self.objective, self.records = objective, records
        whole = objective.eval_count(len(records))
        n = val_batches * cfg.schedule.batch_size
        self.sample = None if val_batches == -1 or val_batches >= whole else \
            validation_sample(objective.lengths(records), n, cfg.seed)
        self.batches = whole if self.sample is None else objective.eval_count(len(self.sample))
        self.records_scored = len(records) if self.sample is None else len(self.sample)
        self.full_at_end = self.sample is not None and cfg.schedule.final_validation == "full"
        self.answers = AnswerScorer(cfg, split, tokenizer, rank, size) if cfg.eval.generate.records else None
        # a mixture: each source's records scored apart (val_loss/NAME), then summed into val_loss
        scored = range(len(records)) if self.sample is None else self.sample
        self.sources = [(name, [i for i in scored if s <= i < e]) for name, s, e in objective.sources.get("valid", [])]
        if self.sources:
            self.batches = sum(objective.eval_count(len(idx)) for _, idx in self.sources if idx)

    def __call__(self, model, iteration: int, ui) -> dict:
        import time

        tic = time.perf_counter()
        extra, info = {}, {"iteration": iteration, "val_loss": None}
        with ui.val_task(self.batches) as advance:
            if self.sources:
                info["val_loss"] = self.by_source(model, advance, extra, info)
            else:
                info["val_loss"] = evaluate(model, self.objective.eval_batches(self.records, self.sample),
                                            self.objective.eval_loss, advance, extra)
        info.update({f"val_{k}": v for k, v in extra.items()})
        if self.answers is not None:
            info.update(self.answers(model))
        info["val_time"] = time.perf_counter() - tic
        return info

    def by_source(self, model, advance, metrics: dict, info: dict) -> float:
        """The loss over every source's records, with each source's own as val_loss/NAME in `info`."""
        total = count = 0.0
        sums: dict = {}
        for name, idx in self.sources:
            if not idx:  # (a sample too small to reach this source)
                continue
            t, c, s = evaluate_sums(model, self.objective.eval_batches(self.records, idx), self.objective.eval_loss,
                                    advance)
            info[f"val_loss/{name}"] = means(t, c, s)
            total, count = total + t, count + c
            sums = {k: sums.get(k, 0.0) + v for k, v in s.items()}
        return means(total, count, sums, metrics)

    def whole_split(self, model) -> float:
        return evaluate(model, self.objective.eval_batches(self.records), self.objective.eval_loss)


class EarlyStopping(Hook):
    """Ends the run, normally, after `patience` validations without an improvement of the monitored metric
    larger than min_delta (the count lives in the run's state, so a resume keeps it)."""

    def __init__(self, settings):
        self.es = settings  # schedule.early_stopping

    def on_validation(self, run, info: dict) -> None:
        best, es = run.state.best, self.es
        if best.waited >= es.patience:
            at = f"best {best.value:.4f} at iteration {best.iteration}" if best.value is not None else "no finite value"
            run.stop_reason = (f"early stopping: {best.metric} has not improved by more than {es.min_delta:g} "
                               f"in {best.waited} validations ({at})")
