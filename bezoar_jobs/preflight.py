"""Before a run spends anything: every file the stages about to run will read is there and holds what they need.

A recipe can load and still fail hours in: a template path with a typo, a template without a placeholder, a seed
file with a broken line or a row of the wrong shape. The stage finds it when it opens the file, but by then the
stages before it have run (a filter's rubric is read after the generate stages paid for their data). ``bezoar
plan`` and ``bezoar run`` (the local executor) now look first, for the stages that will run (a committed stage
that is skipped reads nothing):

* each template (a ``TemplateRef`` field, and every operation's file of ``generation.evol.templates_dir``) the
  stage uses is read and must contain its placeholders (:data:`bezoar_jobs.data.inputs.TEMPLATE_PLACEHOLDERS`,
  the same table the stage loads it with);
* each dataset field that names a file here (a local path or ``pkg://``) is opened and its first
  :data:`PREFLIGHT_ROWS` rows read with the checks the stage applies (:func:`bezoar_jobs.data.io.stream_rows`,
  with :data:`bezoar_jobs.data.inputs.SOURCE_FIELDS`); an empty one is refused, as the stage refuses it.

What is not looked at: hub datasets and ``s3://`` files (nothing is downloaded to plan a run; the stage reads
them), the rows past the first :data:`PREFLIGHT_ROWS` of a seed file (the Flan Collection is many GB; the stage
reports a bad row further on with its line), and the Kubernetes executor (the files are the stage images' and the
run store's, not the controller's). Every problem found is reported at once, on one line, with exit 2.

Which fields a stage reads comes from the registry (``reads``), so a new scheme's files are checked without a line
here; the templates that one setting makes the stage use instead of another are in :data:`ALTERNATIVES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .errors import BadInput
from .recipe import TemplateRef
from .recipe_base import DatasetSource
from .recipe_view import get_path
from .registry import spec

if TYPE_CHECKING:
    from .recipe import Recipe

PREFLIGHT_ROWS = 1000

# a template or dataset field the stage reads only under a setting (the other of a pair is not read)
ALTERNATIVES: dict[str, Callable[[Recipe], bool]] = {
    "filter.rubric_template": lambda r: r.filter.method != "logprobs",
    "filter.rating_template": lambda r: r.filter.method == "logprobs",
    "generation.orca.response_template": lambda r: not r.generation.orca.show_gold_target,
    "generation.orca.gold_response_template": lambda r: r.generation.orca.show_gold_target,
    "generation.lamini.topic_list_template": lambda r: r.generation.lamini.topics is None,
}


def _walk(obj: Any, path: str) -> Iterator[tuple[str, Any]]:  # noqa: ANN401 - any part of the recipe
    """Every TemplateRef and DatasetSource under ``obj`` (at dotted ``path``), with its path."""
    if isinstance(obj, TemplateRef | DatasetSource):
        yield path, obj
    elif isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            yield from _walk(getattr(obj, name), f"{path}.{name}")
    elif isinstance(obj, list | tuple):
        for i, item in enumerate(obj):
            yield from _walk(item, f"{path}[{i}]")


def files_read(recipe: Recipe, stages: list[str]) -> dict[str, TemplateRef | DatasetSource | str]:
    """``{field: what it names}`` for every template and dataset the ``stages`` read (an evolution operation's
    file as ``generation.evol.templates_dir (<operation>.txt)``: its URI)."""
    out: dict[str, TemplateRef | DatasetSource | str] = {}
    for name in stages:
        for read in spec(name).reads:
            for field, ref in _walk(get_path(recipe, read), read):
                when = ALTERNATIVES.get(field)
                if when is None or when(recipe):
                    out[field] = ref
            if read in ("generation.evol", "generation"):
                cfg = recipe.generation.evol
                for op in (*cfg.depth_operations, "breadth"):
                    out[f"generation.evol.templates_dir ({op}.txt)"] = f"{cfg.templates_dir.rstrip('/')}/{op}.txt"
    return out


def check_inputs(recipe: Recipe, stages: list[str]) -> None:
    """Raise BadInput naming every field whose file the ``stages`` cannot use (see the module docstring)."""
    from .data.inputs import SOURCE_FIELDS, placeholders
    from .data.io import is_local_source, load_template

    problems: list[str] = []
    for field, ref in sorted(files_read(recipe, stages).items()):
        try:
            if isinstance(ref, DatasetSource):
                if is_local_source(ref.path):
                    required, text = SOURCE_FIELDS.get(field, ((), ()))
                    _first_rows(ref, required, text, field)
            else:
                uri = ref.path if isinstance(ref, TemplateRef) else ref
                if is_local_source(uri):
                    load_template(uri, field if isinstance(ref, str) else f"{field}.path", placeholders(field))
        except BadInput as e:  # named by its field (a missing file's error names the file only)
            problems.append(str(e) if str(e).startswith(field.split(" (", 1)[0]) else f"{field}: {e}")
    if problems:
        raise BadInput("; ".join(problems))


def _first_rows(src: DatasetSource, required: tuple[str, ...], text: tuple[str, ...], field: str) -> None:
    from .data.io import stream_rows

    n = 0
    for _ in stream_rows(src, required, field, text):
        n += 1
        if n >= PREFLIGHT_ROWS:
            return
    if n == 0:
        raise BadInput(f"{field}.path: {src.path}: the dataset is empty")
