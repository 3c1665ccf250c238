"""What each recipe field that names a file must hold: a template's placeholders, a seed file's fields.

One table, read by the stages when they load a file (:func:`bezoar_jobs.data.io.load_template`) and by the
preflight before a run spends anything (:mod:`bezoar_jobs.preflight`), so the two cannot disagree. Keys are
the recipe's dotted field paths, as the error messages name them.

This module imports nothing: the controller, the plan and the stages all read it.
"""

from __future__ import annotations

DOLLY_FIELDS = ("instruction", "context", "response", "category")
FLAN_FIELDS = ("inputs", "targets", "task_source", "task_name", "template_type")

# template field -> the placeholders its file must contain (a template without one would send every prompt
# without that part: refused before the first request)
TEMPLATE_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "generation.lamini.topic_list_template": ("category", "examples", "n"),
    "generation.lamini.example_template": ("examples", "n"),
    "generation.lamini.topic_template": ("examples", "topics", "n"),
    "generation.lamini.response_template": ("instruction",),
    "generation.evol.response_template": ("instruction",),
    "generation.evol.equality_template": ("first", "second"),
    "generation.evol.templates_dir": ("instruction",),  # every operation's file: <dir>/<operation>.txt
    "generation.orca.response_template": ("inputs",),
    "generation.orca.gold_response_template": ("inputs", "targets"),
    "filter.rubric_template": ("instruction", "response"),
    "filter.rating_template": ("instruction", "response"),
}

# dataset field -> (the fields each of its rows must have, those of them that must be text); a field not listed:
# its reader checks its rows itself (HH-RLHF skips and counts a bad row, MT-Bench names it)
SOURCE_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "seeds.dolly": (DOLLY_FIELDS, DOLLY_FIELDS),
    "seeds.flan": (FLAN_FIELDS, FLAN_FIELDS),
    "generation.lamini.topics": (("topic",), ("topic",)),
    "generation.orca.system_messages": (("id", "text", "submixes"), ("text",)),
}


def row_checks(field: str) -> dict[str, tuple[str, ...]]:
    """The checks of each row of dataset field ``field`` (``required``, ``text``), as the readers take them
    (bezoar_jobs/data/io.py ``stream_rows``)."""
    required, text = SOURCE_FIELDS[field]
    return {"required": required, "text": text}


def placeholders(field: str) -> tuple[str, ...]:
    """The placeholders the template named by recipe field ``field`` must contain (the field's path, with an
    evolution operation's file as ``generation.evol.templates_dir (<operation>.txt)``)."""
    return TEMPLATE_PLACEHOLDERS[field.split(" (", 1)[0]]
