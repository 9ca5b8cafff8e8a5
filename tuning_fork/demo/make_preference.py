"""How demo/preference/ was made from the demo conversations: the prompt is a record's system and user turns,
`chosen` its answer, `rejected` the same answer with its last number taken from another record's answer
(a wrong fact in the same words), or another record's answer when it has no number.

    python tuning_fork/demo/make_preference.py
"""

import json
import re
from pathlib import Path

HERE = Path(__file__).parent
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def last_number(text: str):
    found = list(NUMBER.finditer(text))
    return found[-1] if found else None


def pairs(records: list[dict]) -> list[dict]:
    out = []
    for i, rec in enumerate(records):
        system, user, answer = (m["content"] for m in rec["messages"])
        rejected = None
        for k in range(1, len(records)):
            other = records[(i + k) % len(records)]["messages"][-1]["content"]
            mine, theirs = last_number(answer), last_number(other)
            if mine and theirs and theirs.group() != mine.group():
                rejected = answer[:mine.start()] + theirs.group() + answer[mine.end():]
                break
            if not mine and other != answer:
                rejected = other
                break
        out.append({"system": system, "prompt": user, "chosen": answer, "rejected": rejected})
    return out


if __name__ == "__main__":
    (HERE / "preference").mkdir(exist_ok=True)
    for name in ("train", "valid"):
        records = [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines() if line.strip()]
        (HERE / "preference" / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs(records)))
