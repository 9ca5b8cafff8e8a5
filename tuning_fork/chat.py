"""Conversations into training rows: the tokens, and the spans of them that train (the assistant turns).

Chat templates rewrite conversations: reasoning models strip `<think>` blocks from assistant messages (some
from every turn, some from earlier turns only), some open the generation prompt with a tag, some inject a
date or a default system prompt, some render the last assistant turn differently from earlier ones. So a
turn's target is never found by assuming that the prompt's tokens begin the record's tokens. Instead each
assistant turn is trained as it is generated at inference:

    prompt  = the template's rendering of the turns before it, with the generation prompt
    target  = what the template renders for the turn as the last one, after that prompt (its content, the
              reasoning as the template renders a final turn, tool calls, the end-of-turn text)

Turns share one row while the next turn's prompt begins with the row so far (chatml, Llama 3, ...); a
template that renders history differently (e.g. without the reasoning it showed in the final turn) starts
a new row, so each turn trains in exactly the context it is generated in. Every target is verified: it must
hold the message's content (and its reasoning, unless data.reasoning=drop), the tokenizer must not merge a
prompt's end with a target's start, and the target tokens must decode to the target text. A record that
fails is a one-line error naming the file, line and turn, or is counted and skipped
(data.mask_mismatch=skip) — never trained silently.

Reasoning is read from a message's "reasoning_content" or a leading <think>…</think> block of its content,
and given to the template as `<think>\\n{reasoning}\\n</think>\\n\\n{answer}` (the form Qwen3 and DeepSeek-R1
render and generate). When the template would drop it (DeepSeek-R1's strips it from every assistant turn,
opening the generation prompt with `<think>\\n`), it is kept as target, right after that prompt.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .errors import DataError

THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)


class MaskError(DataError):
    """A record whose targets cannot be found or verified under the chat template."""


def split_reasoning(message: dict) -> tuple[str | None, str]:
    """(reasoning or None, the answer) of an assistant message."""
    content = message.get("content") or ""
    if isinstance(message.get("reasoning_content"), str):
        return message["reasoning_content"].strip("\n"), content
    m = THINK.match(content)
    if m:
        return m.group(1).strip("\n"), content[m.end():]
    return None, content


def shown(message: dict, keep: bool) -> dict:
    """The assistant message as the template is given it: reasoning inline (keep) or left out."""
    reasoning, answer = split_reasoning(message)
    out = {k: v for k, v in message.items() if k != "reasoning_content"}
    out["content"] = f"<think>\n{reasoning}\n</think>\n\n{answer.lstrip()}" if reasoning and keep else answer
    return out


@dataclass
class Stats:
    """What encoding did, for the run header and summary=true."""

    reasoning: int = 0  # assistant turns with reasoning
    dropped_by_template: int = 0  # ... that the template would have dropped (kept as target anyway)
    conversations: int = 0
    rows: int = 0
    skipped: list = field(default_factory=list)  # (where, why) of records skipped under mask_mismatch=skip

    def notes(self, name: str, keep: bool) -> list[str]:
        out = []
        if self.reasoning:
            how = ("trained as target" if keep else "left out (data.reasoning=drop)")
            extra = (f"; the chat template drops it from {self.dropped_by_template}, kept after the generation "
                     "prompt" if keep and self.dropped_by_template else "")
            out.append(f"{name}: reasoning in {self.reasoning} assistant turns: {how}{extra}")
        if self.rows > self.conversations:
            out.append(f"{name}: {self.conversations} conversations train as {self.rows} rows: the chat template "
                       "renders earlier turns differently in later prompts, so each turn trains in its own prompt")
        if self.skipped:
            where, why = self.skipped[0]
            out.append(f"{name}: {len(self.skipped)} records skipped (data.mask_mismatch=skip), first at {where}: {why}")
        return out


class Conversations:
    """Encodes conversations with one tokenizer and prompt format (`tokenizer`: the model's own template)."""

    def __init__(self, tokenizer, fmt: str, data):
        self.tokenizer, self.fmt = tokenizer, str(fmt)
        self.keep = str(data.get("reasoning", "keep")) == "keep"
        self.last_only = str(data.get("train_on", "all_assistant")) == "last_assistant"
        self.mask = bool(data.get("mask_prompt", False))
        self.skip = str(data.get("mask_mismatch", "error")) == "skip"
        self.stats = Stats()
        if self.fmt == "tokenizer":
            from .models import require_chat_template

            require_chat_template(tokenizer, "the model's tokenizer")

    # ------------------------------------------------------------------------------------------ text

    def render(self, messages, tools, add_generation_prompt: bool) -> str:
        if self.fmt == "tokenizer":
            return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        from .prompts import render

        return render(self.fmt, messages, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, messages, tools) -> list[int]:
        """The tokens a model is prompted with to answer after `messages` (the generation prompt included)."""
        return self.encode(self.render(messages, tools, True))

    def turn(self, messages, k: int, tools) -> tuple[str, str]:
        """(prompt text, target text) of assistant turn k, the turn rendered as the last one."""
        if split_reasoning(messages[k])[0]:
            self.stats.reasoning += 1
        message = shown(messages[k], self.keep)
        reasoning, answer = split_reasoning(message)
        head = self.render(messages[:k], tools, True)
        whole = self.render(messages[:k] + [message], tools, False)
        common = os.path.commonprefix([head, whole])
        prompt, target = common, whole[len(common):]  # a prefix-stable template: prompt == head
        if reasoning and reasoning.strip() not in target:  # the template drops it (DeepSeek-R1)
            self.stats.dropped_by_template += 1
            prompt, target = head, self.reinsert(head[len(common):], target, message, answer)
        self.check_text(target, messages[k], reasoning, answer)
        return prompt, target

    @staticmethod
    def reinsert(opened: str, rendered: str, message: dict, answer: str) -> str:
        """The target with the reasoning the template dropped: the message's content after what the
        generation prompt `opened` the answer with (e.g. "<think>\\n"), then the template's end of turn."""
        visible = answer.strip()
        at = rendered.find(visible) if visible else len(rendered)
        if at < 0:
            raise MaskError("the chat template leaves the answer out of its own rendering")
        content = message["content"]
        return (content[len(opened):] if opened and content.startswith(opened) else content) + \
            rendered[at + len(visible):]

    def check_text(self, target: str, original: dict, reasoning, answer: str) -> None:
        if answer.strip() and answer.strip() not in target:
            raise MaskError(f"the chat template rewrites the answer (its target is {target[:60]!r})")
        if reasoning and self.keep and reasoning.strip() not in target:
            raise MaskError("the chat template drops the reasoning and it cannot be put back")
        for call in original.get("tool_calls") or []:
            name = (call.get("function") or call).get("name") if isinstance(call, dict) else None
            if name and name not in target:
                raise MaskError(f"the chat template leaves tool call {name!r} out of the answer")

    # ---------------------------------------------------------------------------------------- tokens

    def rows(self, messages, tools, where: str) -> list[tuple[list[int], tuple]]:
        """The training rows of one conversation: (token ids, target spans [(start, end), ...] of tokens).
        With data.mask_prompt=false, one row, every token of it a target: the template's rendering of the
        whole conversation (no mask to get wrong, so nothing to verify), reasoning inline unless
        data.reasoning=drop. [] for a record skipped (mask_mismatch)."""
        if not self.mask:
            self.stats.reasoning += sum(1 for m in messages if m.get("role") == "assistant" and split_reasoning(m)[0])
            messages = [shown(m, self.keep) if m.get("role") == "assistant" else m for m in messages]
            ids = self.encode(self.render(messages, tools, False))
            return [(ids, ((0, len(ids)),))]
        try:
            texts = self.texts(messages, tools)
            out = [self.tokens(text, spans) for text, spans in texts]
        except MaskError as e:
            if not self.skip:
                raise MaskError(f"{where}: {e}: choose another prompt format (prompt=chatml|...), set "
                                "data.mask_prompt=false, or data.mask_mismatch=skip to count and skip such records") from None
            self.stats.skipped.append((where, str(e)))
            return []
        self.stats.conversations += 1
        self.stats.rows += len(out)
        return out

    def texts(self, messages, tools) -> list[tuple[str, list]]:
        """Rows as (text, target character spans)."""
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if self.last_only:
            turns = turns[-1:]
        if not turns:  # nothing to answer: no target (the record is dropped as having none)
            return [(self.render(messages, tools, False), [])]
        rows: list[tuple[str, list]] = []
        for n, k in enumerate(turns, 1):
            try:
                prompt, target = self.turn(messages, k, tools)
            except MaskError as e:
                raise MaskError(f"assistant turn {n}: {e}") from None
            spans = rows.pop()[1] if rows and prompt.startswith(rows[-1][0]) else []  # the row goes on
            rows.append((prompt + target, spans + [(len(prompt), len(prompt) + len(target))]))
        return rows

    def tokens(self, text: str, spans: list) -> tuple[list[int], tuple]:
        """Token ids of `text` (as the template's tokenization gives them) and the token spans of the
        character spans; each boundary must fall between tokens, and each span decode to its text."""
        ids = self.encode(text)
        at = {0: 0, len(text): len(ids)}
        for a, b in spans:
            for c in (a, b):
                if c not in at:
                    head = self.encode(text[:c])
                    if ids[:len(head)] != head:
                        raise MaskError(f"the tokenizer merges the text either side of {text[max(0, c - 12):c]!r}|"
                                        f"{text[c:c + 12]!r} into one token, so the answer cannot be cut out")
                    at[c] = len(head)
        out = tuple((at[a], at[b]) for a, b in spans)
        hf = getattr(self.tokenizer, "_tokenizer", self.tokenizer)
        for (a, b), (s, e) in zip(spans, out):
            got = hf.decode(ids[s:e], clean_up_tokenization_spaces=False)
            if got.strip() != text[a:b].strip():
                raise MaskError(f"the target tokens decode to {got[:40]!r}, not {text[a:b][:40]!r}")
        return ids, out
