"""Anthropic HH-RLHF dialogues: parsing, SFT examples and DPO pairs.

A row of HH-RLHF holds two whole dialogues, ``chosen`` and ``rejected``, written as
``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ..."``. They share every turn except the final
assistant reply. Only a speaker name that starts a paragraph (a blank line, then ``Human:`` or
``Assistant:``) begins a turn, so "Human:" in the middle of a sentence stays text.

- SFT (``sft-hh``): the target is the chosen dialogue's final assistant turn; the earlier turns are
  the context (:func:`sft_example`).
- DPO: prompt = the dialogue up to the last assistant turn; chosen/rejected = the two final
  assistant turns (:func:`dpo_pair`).

Rows that cannot make an example (no final assistant reply, an empty reply, an empty final human
turn, chosen and rejected with different contexts) are skipped with a reason the stage counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .prompt_format import Turn, render_prompt

HUMAN = "Human"
ASSISTANT = "Assistant"

# A turn starts at a paragraph break followed by a speaker name and a colon. The start of the text,
# after any white space, counts as a paragraph break (a few rows lack the leading blank line, or
# have one line break or a space before the first "Human:").
_MARKER = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")


@dataclass(frozen=True)
class Message:
    role: str  # "Human" | "Assistant"
    text: str


def parse_dialogue(text: str) -> list[Message]:
    """Split a dialogue into messages, in order; consecutive messages of one speaker are joined with
    a blank line (the data has a few double turns). Text before the first marker is refused."""
    if not isinstance(text, str):
        raise ValueError(f"dialogue is not a string but {type(text).__name__}")
    marks = list(_MARKER.finditer(text))
    if not marks:
        raise ValueError("no 'Human:' or 'Assistant:' turn found")
    lead = text[: marks[0].start()]
    if lead.strip():
        raise ValueError(f"text before the first turn: {lead.strip()[:60]!r}")
    out: list[Message] = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        body = text[m.end() : end].strip()
        role = m.group(1)
        if out and out[-1].role == role:
            joined = "\n\n".join(t for t in (out[-1].text, body) if t)
            out[-1] = Message(role, joined)
        else:
            out.append(Message(role, body))
    return out


class SkipRow(ValueError):
    """A row that cannot become an example; ``reason`` is a short key the stage counts."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class DialogueParts:
    history: tuple[Turn, ...]  # completed (human, assistant) exchanges before the final one
    instruction: str  # the final human turn
    reply: str  # the final assistant turn


def split_final(messages: list[Message]) -> DialogueParts:
    """The context and the final (human, assistant) exchange of a parsed dialogue."""
    if not messages or messages[-1].role != ASSISTANT:
        raise SkipRow("no_final_assistant", "the dialogue does not end with an assistant turn")
    if len(messages) < 2 or messages[-2].role != HUMAN:
        raise SkipRow("no_final_human", "no human turn before the final assistant turn")
    reply, instruction = messages[-1].text, messages[-2].text
    if not reply:
        raise SkipRow("empty_reply", "the final assistant turn is empty")
    if not instruction:
        raise SkipRow("empty_instruction", "the final human turn is empty")
    context = messages[:-2]
    if context and context[0].role == ASSISTANT:
        # the dialogue opens with the assistant: keep that text as a reply to an empty user turn
        context = [Message(HUMAN, ""), *context]
    history = []
    for i in range(0, len(context) - 1, 2):
        history.append(Turn(context[i].text, context[i + 1].text))
    if len(context) % 2:
        # a dangling human turn (a human turn right before the final human turn was joined already,
        # so this cannot happen after parse_dialogue; kept as a guard)
        raise SkipRow("malformed", "unpaired turn in the context")
    return DialogueParts(tuple(history), instruction, reply)


def sft_example(row: dict[str, Any], system: str | None = None) -> tuple[str, str]:
    """(prompt, completion) of ``sft-hh`` for one HH-RLHF row (from its ``chosen`` dialogue)."""
    if "chosen" not in row:
        raise SkipRow("missing_chosen", "the row has no 'chosen' field")
    try:
        parts = split_final(parse_dialogue(row["chosen"]))
    except SkipRow:
        raise
    except ValueError as e:
        raise SkipRow("unparseable", str(e)) from None
    prompt = render_prompt(parts.instruction, system=system, history=parts.history)
    return prompt, parts.reply


def dpo_pair(row: dict[str, Any], system: str | None = None) -> dict[str, str]:
    """{prompt, chosen, rejected} for DPO from one HH-RLHF row."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise SkipRow(f"missing_{key}", f"the row has no {key!r} field")
    try:
        c = split_final(parse_dialogue(row["chosen"]))
        r = split_final(parse_dialogue(row["rejected"]))
    except SkipRow:
        raise
    except ValueError as e:
        raise SkipRow("unparseable", str(e)) from None
    if c.history != r.history or c.instruction != r.instruction:
        raise SkipRow("context_mismatch", "chosen and rejected differ before the final assistant turn")
    if c.reply == r.reply:
        raise SkipRow("identical_replies", "chosen and rejected final replies are the same")
    return {
        "prompt": render_prompt(c.instruction, system=system, history=c.history),
        "chosen": c.reply,
        "rejected": r.reply,
    }


def load_hh_rows(source: Any, field: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) for the first ``source.limit`` rows; ``where`` names the source and row number
    for messages. Loading itself (hub id, local / s3 / pkg:// file) is :func:`bezoar_jobs.data.io.load_rows`."""
    from .io import load_rows

    rows = load_rows(source, required=(), field=field)
    return [(f"{source.path} row {i}", row) for i, row in enumerate(rows, start=1)]
