"""MT-Bench judge prompts: our sectioned template file, or FastChat's ``judge_prompts.jsonl``.

Four prompts grade single answers (the paper's setting): ``single`` (turn 1), ``single-ref``
(turn 1 with a reference answer), ``turn2`` (the second reply, with the whole conversation shown)
and ``turn2-ref``. Both file formats use FastChat's placeholder names ({question}, {answer},
{ref_answer_1}, {question_1}, {answer_1}, {question_2}, {answer_2}, {ref_answer_2}), so either file
fills the same slots.

Our format (``templates/mtbench_judge.txt``): sections introduced by a line ``@@ <name>``; a
``system`` section is the system message of all four prompts; an ``about`` section is ignored.

FastChat's format: one JSON object per line with ``name``, ``type``, ``system_prompt``,
``prompt_template`` and ``output_format``; the entries named ``single-v1``, ``single-math-v1``,
``single-v1-multi-turn`` and ``single-math-v1-multi-turn`` are taken for the four prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..data.io import iter_jsonl_lines, read_text_uri, render
from ..errors import BadInput

KINDS: tuple[str, ...] = ("single", "single-ref", "turn2", "turn2-ref")

# the slots each prompt must have: without them the judge would not see what it grades
REQUIRED: dict[str, tuple[str, ...]] = {
    "single": ("question", "answer"),
    "single-ref": ("question", "answer", "ref_answer_1"),
    "turn2": ("question_1", "answer_1", "question_2", "answer_2"),
    "turn2-ref": ("question_1", "answer_1", "question_2", "answer_2", "ref_answer_2"),
}

FASTCHAT_NAMES: dict[str, str] = {
    "single": "single-v1",
    "single-ref": "single-math-v1",
    "turn2": "single-v1-multi-turn",
    "turn2-ref": "single-math-v1-multi-turn",
}

_SECTION = re.compile(r"^@@[ \t]*([A-Za-z0-9_-]+)[ \t]*$", re.M)


@dataclass(frozen=True)
class JudgePrompt:
    kind: str  # one of KINDS
    name: str  # the name in its file (FastChat's entry name, or ours)
    system: str | None
    template: str

    def render(self, **values: str) -> str:
        """Fill the named slots only: braces elsewhere (code in answers, JSON) are left alone."""
        return render(self.template, **values)


@dataclass(frozen=True)
class JudgePrompts:
    source: str
    prompts: dict[str, JudgePrompt]

    def pick(self, turn: int, with_reference: bool) -> JudgePrompt:
        kind = ("single" if turn == 1 else "turn2") + ("-ref" if with_reference else "")
        return self.prompts[kind]


def load_judge_prompts(uri: str, field: str = "evaluation.mtbench.judge_prompts") -> JudgePrompts:
    """Load our sectioned template (any name) or FastChat's judge_prompts.jsonl (``.jsonl``)."""
    try:
        text = read_text_uri(uri)
    except BadInput as e:
        raise BadInput(f"{field}: {e}") from None
    prompts = _from_fastchat(text, uri, field) if uri.endswith(".jsonl") else _from_sections(text, uri, field)
    for kind in KINDS:
        p = prompts[kind]
        missing = [s for s in REQUIRED[kind] if "{" + s + "}" not in p.template]
        if missing:
            raise BadInput(f"{field}: {uri}: prompt {p.name!r} ({kind}) lacks the slot(s) "
                           + ", ".join("{" + m + "}" for m in missing))
    return JudgePrompts(source=uri, prompts=prompts)


def _from_sections(text: str, uri: str, field: str) -> dict[str, JudgePrompt]:
    marks = list(_SECTION.finditer(text))
    if not marks:
        raise BadInput(f"{field}: {uri}: no '@@ <name>' section lines (expected {', '.join(('system', *KINDS))})")
    sections: dict[str, str] = {}
    for i, m in enumerate(marks):
        name = m.group(1)
        line = text.count("\n", 0, m.start()) + 1
        if name in sections:
            raise BadInput(f"{field}: {uri}:{line}: section '@@ {name}' appears twice")
        if name not in ("about", "system", *KINDS):
            raise BadInput(
                f"{field}: {uri}:{line}: unknown section '@@ {name}' (known: about, system, {', '.join(KINDS)})"
            )
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        sections[name] = text[m.end():end].strip("\n").strip()
    missing = [k for k in KINDS if not sections.get(k)]
    if missing:
        raise BadInput(f"{field}: {uri}: missing or empty section(s) {', '.join('@@ ' + k for k in missing)}")
    system = sections.get("system") or None
    return {k: JudgePrompt(kind=k, name=k, system=system, template=sections[k]) for k in KINDS}


def _from_fastchat(text: str, uri: str, field: str) -> dict[str, JudgePrompt]:
    entries: dict[str, tuple[int, dict]] = {}
    for n, obj in iter_jsonl_lines(text.splitlines(), f"{field}: {uri}"):
        if "name" not in obj or "prompt_template" not in obj:
            raise BadInput(f"{field}: {uri}:{n}: a judge prompt needs 'name' and 'prompt_template'")
        entries[str(obj["name"])] = (n, obj)
    out = {}
    for kind, name in FASTCHAT_NAMES.items():
        if name not in entries:
            raise BadInput(f"{field}: {uri}: no entry named {name!r} (needed for the {kind} prompt)")
        n, obj = entries[name]
        fmt = obj.get("output_format")
        if fmt is not None and fmt != "[[rating]]":
            raise BadInput(
                f"{field}: {uri}:{n}: {name!r} has output_format {fmt!r}; single-answer grading needs '[[rating]]'"
            )
        kind_type = obj.get("type")
        if kind_type is not None and kind_type != "single":
            raise BadInput(f"{field}: {uri}:{n}: {name!r} has type {kind_type!r}, expected 'single'")
        out[kind] = JudgePrompt(kind=kind, name=name, system=obj.get("system_prompt") or None,
                                template=str(obj["prompt_template"]))
    return out
