"""Rewards for objective=grpo: functions you write, and a few built in.

A reward has the signature of TRL's reward functions, so one written for TRL works unchanged:

    def my_reward(prompts, completions, **fields) -> list[float]

`prompts` and `completions` have one entry per completion (a prompt repeated for each of its group);
`fields` holds the record's other columns (e.g. `answer`), one value per completion. With chat prompts
(`{"messages": [...]}`), prompts are message lists and completions `[{"role": "assistant", "content": ...}]`,
as TRL passes them; otherwise both are strings. A value may be None (the reward does not apply): it counts
as nothing in the weighted sum, as in TRL.

`objective.rewards` lists them, each a Hydra `_target_` with its arguments and a `weight` (default 1):

    objective.rewards:
      - {_target_: my_rewards.correct, weight: 1.0}
      - {_target_: tuning_fork.rewards.format, pattern: "^<answer>.*</answer>$", weight: 0.5}
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from .errors import ConfigError, TuningForkError

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def text(completion) -> str:
    """A completion's text, whether a string or TRL's conversational form."""
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))
    return completion


def exact(prompts, completions, field: str = "answer", strip: bool = True, ignore_case: bool = False, **fields):
    """1.0 where the completion equals the record's `field` (whitespace-stripped; optionally case-blind)."""
    def norm(s):
        s = str(s).strip() if strip else str(s)
        return s.lower() if ignore_case else s

    return [float(norm(text(c)) == norm(a)) for c, a in zip(completions, column(fields, field, "exact"))]


def numeric(prompts, completions, field: str = "answer", tolerance: float = 1e-6, **fields):
    """1.0 where the last number in the completion equals the record's `field` (within `tolerance`, relative
    to the larger magnitude, or absolute near zero); 0.0 where the completion has no number."""
    out = []
    for c, a in zip(completions, column(fields, field, "numeric")):
        found = NUMBER.findall(text(c))
        if not found:
            out.append(0.0)
            continue
        got, want = float(found[-1].replace(",", "")), float(str(a).replace(",", ""))
        out.append(float(abs(got - want) <= tolerance * max(1.0, abs(got), abs(want))))
    return out


def f1(prompts, completions, field: str = "answer", **fields):
    """Token F1 between the completion and the record's `field`, as SQuAD scores answers (evaluation.token_f1):
    partial credit for the right words."""
    from .evaluation import token_f1

    return [token_f1(text(c), str(a)) for c, a in zip(completions, column(fields, field, "f1"))]


def format(prompts, completions, pattern: str, **fields):  # noqa: A001  (the name users write in configs)
    """1.0 where `pattern` (a Python regular expression, dot matching newlines) matches the completion."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.search(text(c)) is not None) for c in completions]


def length(prompts, completions, target: int, **fields):
    """1.0 at `target` characters, falling linearly to 0.0 at twice or none of them."""
    return [max(0.0, 1.0 - abs(len(text(c)) - target) / target) for c in completions]


def column(fields: dict, name: str, reward: str) -> list:
    if name not in fields:
        raise TuningForkError(f"reward {reward}: the records have no field {name!r} (they have "
                              f"{', '.join(sorted(fields)) or 'none besides the prompt'}): set its `field`")
    return fields[name]


# ------------------------------------------------------------------------------------------ the rewards


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float


def build(specs) -> list[Reward]:
    """objective.rewards as callables, each with its name and weight; a mistake is one line naming it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if not specs:
        raise ConfigError("objective=grpo needs objective.rewards: a list of {_target_: module.function, weight: w}, "
                          "e.g. '+objective.rewards=[{_target_: tuning_fork.rewards.length, target: 40}]'")
    out, names = [], set()
    for i, spec in enumerate(specs):
        spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec)
        if not isinstance(spec, dict) or "_target_" not in spec:
            raise ConfigError(f"objective.rewards[{i}]: a reward is {{_target_: module.function, ...}}, got {spec!r}")
        weight = spec.pop("weight", 1.0)
        name = spec.pop("name", None) or str(spec["_target_"]).rsplit(".", 1)[-1]
        try:
            # the user's own config names the function: that target, and it alone, may run (Hydra 1.4's whitelist)
            fn = instantiate(spec, _partial_=True, _execution_whitelist_=[str(spec["_target_"])])
        except InstantiationException as e:
            raise ConfigError(f"objective.rewards[{i}] ({spec['_target_']}): {str(e).splitlines()[0]} (is its module "
                              "importable from here, on PYTHONPATH? are its arguments right?)") from None
        if not callable(fn):
            raise ConfigError(f"objective.rewards[{i}] ({spec['_target_']}) is not a function")
        if not isinstance(weight, (int, float)):
            raise ConfigError(f"objective.rewards[{i}].weight={weight!r}: use a number")
        while name in names:
            name += "_"
        names.add(name)
        out.append(Reward(name, fn, float(weight)))
    return out


def score(rewards: list[Reward], prompts: list, completions: list, fields: dict) -> tuple[list[float], dict]:
    """(the weighted sum per completion, {reward name: its values}). A reward that raises, or returns the wrong
    number of values or something that is not a number, is one line naming it."""
    per = {}
    for r in rewards:
        try:
            values = r.fn(prompts=prompts, completions=completions, **fields)
        except TuningForkError:
            raise
        except Exception as e:
            raise TuningForkError(f"reward {r.name} raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                  ) from None
        try:
            values = [None if v is None else float(v) for v in values]
        except (TypeError, ValueError):
            raise TuningForkError(f"reward {r.name} returned {type(values).__name__} values that are not numbers: "
                                  "return a list of floats, one per completion") from None
        if len(values) != len(completions):
            raise TuningForkError(f"reward {r.name} returned {len(values)} values for {len(completions)} completions: "
                                  "return one per completion")
        per[r.name] = values
    total = []
    for i in range(len(completions)):
        parts = [r.weight * per[r.name][i] for r in rewards if per[r.name][i] is not None]
        total.append(sum(parts) if parts else math.nan)
    return total, per
