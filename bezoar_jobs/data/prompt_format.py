"""The one prompt format of the OpenBezoar models, used by training, MT-Bench answering and the report.

The released OpenBezoar checkpoints are trained on this layout (from their model cards)::

    ### System:
    {system}

    ### Instruction:
    {instruction}

    ### Response:
    {response}<eos>

Rules this module fixes (the parts the paper leaves open are marked as our choice):

- ``system`` defaults to :data:`DEFAULT_SYSTEM`; Orca rows put their own system message there. An
  empty system message (Orca's first one is empty) falls back to the default (our choice: an empty
  ``### System:`` block is not a layout the released models saw).
- An optional ``input`` (context) is appended to the instruction after one blank line (our choice:
  neither the paper nor the model cards say how an input is rendered).
- Earlier turns of a multi-turn dialogue (HH-RLHF context, MT-Bench turn 2) are rendered as
  completed ``### Instruction:`` / ``### Response:`` pairs between the system block and the final
  instruction (our choice), with no end-of-sequence token after them: only the final response ends
  with EOS, so the model learns to stop there.
- Every text is stripped of leading and trailing whitespace; the response follows the newline after
  ``### Response:`` directly.

The tokenizer's end-of-sequence token is appended by the caller that tokenizes
(:func:`bezoar_jobs.training.examples.tokenize_example`), because it is a token, not text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_SYSTEM = (
    "Below is an instruction that describes a task, optionally paired with an input that provides further "
    "context following that instruction. Write a response that appropriately completes the request."
)

SYSTEM_HEADER = "### System:"
INSTRUCTION_HEADER = "### Instruction:"
RESPONSE_HEADER = "### Response:"

# Generation should stop if the model starts a new block by itself.
STOP_STRINGS: tuple[str, ...] = (f"\n{INSTRUCTION_HEADER}", f"\n{SYSTEM_HEADER}", f"\n{RESPONSE_HEADER}")


@dataclass(frozen=True)
class Turn:
    """One completed exchange of the context: the user's text and the assistant's reply."""

    user: str
    assistant: str


def _instruction_text(instruction: str, input: str | None) -> str:
    text = instruction.strip()
    extra = (input or "").strip()
    return f"{text}\n\n{extra}" if extra else text


def render_prompt(
    instruction: str,
    *,
    system: str | None = None,
    input: str | None = None,
    history: Sequence[Turn | tuple[str, str]] = (),
) -> str:
    """The text the model continues with its response (ends with ``### Response:`` and a newline)."""
    sys_text = (system or "").strip() or DEFAULT_SYSTEM
    parts = [f"{SYSTEM_HEADER}\n{sys_text}\n\n"]
    for turn in history:
        user, assistant = (turn.user, turn.assistant) if isinstance(turn, Turn) else turn
        parts.append(f"{INSTRUCTION_HEADER}\n{user.strip()}\n\n{RESPONSE_HEADER}\n{assistant.strip()}\n\n")
    parts.append(f"{INSTRUCTION_HEADER}\n{_instruction_text(instruction, input)}\n\n{RESPONSE_HEADER}\n")
    return "".join(parts)


def render_response(response: str) -> str:
    """The completion text as trained (EOS is added as a token by the tokenizing code)."""
    return response.strip()


def render_example(
    instruction: str,
    response: str,
    *,
    system: str | None = None,
    input: str | None = None,
    history: Sequence[Turn | tuple[str, str]] = (),
) -> tuple[str, str]:
    """(prompt, completion) of one training example; prompt + completion is the full text."""
    return render_prompt(instruction, system=system, input=input, history=history), render_response(response)


def cut_at_stop(text: str) -> str:
    """A generated response cut where the model began a new block by itself."""
    cut = len(text)
    for stop in STOP_STRINGS:
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()


def chat_template(bos: bool) -> str:
    """A Jinja chat template that renders this format (what ``apply_chat_template`` of a trained model's
    tokenizer produces, for vLLM's, TGI's and transformers' chat routes): the messages' system text or
    :data:`DEFAULT_SYSTEM`, each earlier exchange as a completed pair, the last user message followed by
    ``### Response:`` and a newline, and a final assistant message (a whole example) followed by EOS, exactly
    as :func:`render_prompt` and training lay them out. ``bos``: the trained sequences began with BOS (the
    tokenizer adds one, or the recipe's ``student.add_bos``); chat templates write it themselves, since
    ``apply_chat_template`` tokenizes without the tokenizer's special tokens.

    The base model's own template (SmolLM2's ChatML in the demo) was saved with the checkpoints before: a
    server's chat route prompted a model trained on this layout in another one."""
    nl = "\\n"
    return (
        ("{{- bos_token -}}" if bos else "")
        + "{%- set ns = namespace(system='" + DEFAULT_SYSTEM.replace("'", "\\'") + "') -%}"
        "{%- if messages and messages[0]['role'] == 'system' and (messages[0]['content'] | trim) -%}"
        "{%- set ns.system = messages[0]['content'] | trim -%}"
        "{%- endif -%}"
        "{{- '" + SYSTEM_HEADER + nl + "' ~ ns.system ~ '" + nl + nl + "' -}}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['role'] == 'user' -%}"
        "{{- '" + INSTRUCTION_HEADER + nl + "' ~ (m['content'] | trim) ~ '" + nl + nl + RESPONSE_HEADER + nl + "' -}}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{{- m['content'] | trim -}}"
        "{%- if loop.last -%}{{- eos_token -}}{%- else -%}{{- '" + nl + nl + "' -}}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )
