"""Regenerate docs/recipe-reference.md (every key a recipe may set) from the pydantic models.

The models are the one source: :class:`bezoar_jobs.recipe.Recipe` is walked field by field (nested
sections, optional sections, lists of entries as ``key[]``, maps as ``key.<name>``), and each row gives
the dotted key, its type (constraints and ``Literal`` choices included), its default and the field's
``Field(description=...)``. A model used at more than one place (an endpoint, a decoding block, a
dataset source, a template) gets one table of its own that those places link to. The TRL/PEFT
pass-through mappings (``training.sft_args`` and friends) are one row each: their keys are checked
against bezoar_jobs/passthrough_schema.json, not by the models. tests/test_recipe.py fails when the
file is stale or a field has no description.

Usage: ``python scripts/gen_recipe_reference.py [--check]``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bezoar_jobs.passthrough import PACKAGED  # noqa: E402
from bezoar_jobs.recipe import Recipe  # noqa: E402
from bezoar_jobs.recipe_training import PassValue  # noqa: E402

OUT = REPO / "docs" / "recipe-reference.md"

# the pass-through mappings: dotted key -> (library, config class) their keys are fields of
PASSTHROUGH: dict[str, tuple[str, str]] = {
    "training.lora": ("PEFT", "LoraConfig"),
    "training.sft_args": ("TRL", "SFTConfig"),
    "training.stage_args": ("TRL", "SFTConfig"),
    "training.dpo.dpo_args": ("TRL", "DPOConfig"),
    "training.dpo.lora": ("PEFT", "LoraConfig"),
}


class Row(NamedTuple):
    key: str
    type: str
    default: str
    description: str
    passthrough: bool = False


# ---------------------------------------------------------------------------------------------
# types
# ---------------------------------------------------------------------------------------------
def _alternatives(ann: object) -> list[object]:
    """A union's members (Optional included), each Annotated kept whole."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return list(typing.get_args(ann))
    return [ann]


def _strip(ann: object) -> tuple[object, list[object]]:
    """(the annotation without Annotated, the constraints Annotated carried)."""
    meta: list[object] = []
    while typing.get_origin(ann) is typing.Annotated:
        ann, *extra = typing.get_args(ann)
        for m in extra:
            meta += m.metadata if isinstance(m, FieldInfo) else [m]
    return ann, meta


def _num(v: object) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _bound(meta: list[object], attr: str) -> object:
    """The value of one constraint (``ge``, ``pattern``, ...) among annotated-types metadata, or None."""
    return next((v for m in meta if (v := getattr(m, attr, None)) is not None), None)


def _constrained(base: str, meta: list[object]) -> str:
    """``int > 0``, ``0 <= float <= 1``, ``str matching ^...$, at most 80 characters``."""
    lo = next(((op, v) for op, attr in (("<=", "ge"), ("<", "gt")) if (v := _bound(meta, attr)) is not None), None)
    hi = next(((op, v) for op, attr in (("<=", "le"), ("<", "lt")) if (v := _bound(meta, attr)) is not None), None)
    if lo and hi:
        out = f"{_num(lo[1])} {lo[0]} {base} {hi[0]} {_num(hi[1])}"
    elif lo:
        out = f"{base} {lo[0].replace('<', '>')} {_num(lo[1])}"
    elif hi:
        out = f"{base} {hi[0]} {_num(hi[1])}"
    else:
        out = base
    if (pattern := _bound(meta, "pattern")) is not None:
        out += f" matching {pattern}"
    if (longest := _bound(meta, "max_length")) is not None:
        out += f", at most {longest} characters"
    return out


def type_name(ann: object, shared: dict[type, str], meta: list[object] | None = None) -> str:
    """A readable type: ``int > 0``, ``"generate" | "logprobs"``, ``list[str]``, ``float | null``."""
    parts: list[str] = []
    for alt in _alternatives(ann):
        alt, inner = _strip(alt)
        inner = [*(meta or []), *inner] if len(_alternatives(ann)) == 1 else inner
        origin = typing.get_origin(alt)
        if alt is type(None):
            text = "null"
        elif origin is typing.Literal:
            text = " | ".join(json.dumps(v) for v in typing.get_args(alt))
        elif isinstance(alt, type) and issubclass(alt, BaseModel):
            text = alt.__name__ if alt in shared else "section"
        elif origin in (tuple, list):
            args = typing.get_args(alt)
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                text = "[" + ", ".join(type_name(a, shared) for a in args) + "]"
            else:
                item = args[0]
                text = "list[entry]" if _is_section(item, shared) else f"list[{type_name(item, shared)}]"
        elif origin is dict:
            k, v = typing.get_args(alt)
            text = f"map[{type_name(k, shared)}, {type_name(v, shared)}]"
        elif isinstance(alt, type):
            text = _constrained(alt.__name__, inner)
        else:
            text = str(alt)
        if text not in parts:
            parts.append(text)
    return " | ".join(parts)


def _is_section(ann: object, shared: dict[type, str]) -> bool:
    ann, _ = _strip(ann)
    return isinstance(ann, type) and issubclass(ann, BaseModel) and ann not in shared


def _models(ann: object) -> list[tuple[str, type[BaseModel]]]:
    """(key suffix, model) of every model an annotation holds: "" a section, "[]" a list's entries,
    ".<name>" a map's values."""
    out: list[tuple[str, type[BaseModel]]] = []
    for alt in _alternatives(ann):
        alt, _ = _strip(alt)
        origin = typing.get_origin(alt)
        if isinstance(alt, type) and issubclass(alt, BaseModel):
            out.append(("", alt))
        elif origin in (tuple, list):
            out += [("[]" + s, m) for a in typing.get_args(alt) if a is not Ellipsis for s, m in _models(a)]
        elif origin is dict:
            out += [(".<name>" + s, m) for s, m in _models(typing.get_args(alt)[1])]
    return out


def _is_passthrough(ann: object) -> bool:
    for alt in _alternatives(ann):
        alt, _ = _strip(alt)
        if typing.get_origin(alt) is dict:
            value = typing.get_args(alt)[1]
            if value == PassValue or _is_passthrough(value):
                return True
    return False


# ---------------------------------------------------------------------------------------------
# defaults
# ---------------------------------------------------------------------------------------------
def _plain(value: object) -> object:
    """JSON-able ``value``; a model as its fields that are set (not null, not empty)."""
    if isinstance(value, BaseModel):
        fields = {k: getattr(value, k) for k in type(value).model_fields}
        return {k: _plain(v) for k, v in fields.items() if v not in (None, (), [], {}, "")}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return to_jsonable_python(value)


def default_text(f: FieldInfo, shared: dict[type, str]) -> str:
    if f.is_required():
        return "**required**"
    value = f.get_default(call_default_factory=True)
    if value is None:
        return "`null`"
    if isinstance(value, BaseModel) and type(value) not in shared:
        return "(section)"
    return "`" + _cell(json.dumps(_plain(value), ensure_ascii=False)) + "`"


# ---------------------------------------------------------------------------------------------
# walking the models
# ---------------------------------------------------------------------------------------------
def _placeholder(cls: type) -> str:
    return "<" + re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower() + ">"


def uses(root: type[BaseModel] = Recipe) -> dict[type, list[str]]:
    """Every model -> the dotted keys it is used at (the whole tree expanded), in walk order."""
    found: dict[type, list[str]] = {}

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, f in cls.model_fields.items():
            for suffix, m in _models(f.annotation):
                key = f"{prefix}{name}{suffix}"
                found.setdefault(m, []).append(key)
                walk(m, key + ".")

    walk(root, "")
    return found


def shared_models(root: type[BaseModel] = Recipe) -> dict[type, str]:
    """Models used at more than one key -> their placeholder (``<decoding>``), in first-use order."""
    return {m: _placeholder(m) for m, keys in uses(root).items() if len(keys) > 1}


def rows(cls: type[BaseModel], prefix: str, shared: dict[type, str]) -> list[Row]:
    """One row per field of ``cls`` (sections expanded below their own row; shared models are not)."""
    out: list[Row] = []
    for name, f in cls.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        if _is_passthrough(ann):
            out.append(_passthrough_row(key, f, ann))
            continue
        out.append(Row(key, type_name(ann, shared, list(f.metadata)), default_text(f, shared), f.description or ""))
        for suffix, m in _models(ann):
            if m not in shared:
                out += rows(m, f"{key}{suffix}.", shared)
    return out


def _passthrough_row(key: str, f: FieldInfo, ann: object) -> Row:
    if key not in PASSTHROUGH:
        raise SystemExit(f"{key}: a pass-through mapping not listed in PASSTHROUGH of {Path(__file__).name}")
    lib, cls = PASSTHROUGH[key]
    value = f"map[{cls} field, value]"
    typ = f"map[SFT stage, {value}]" if key.endswith("stage_args") else value
    if type(None) in _alternatives(ann):
        typ += " | null"
    desc = (
        f"{f.description or ''} (passed through to {lib}'s {cls}: each key and its kind of value are checked when "
        "the recipe loads, by bezoar_jobs/passthrough.py against bezoar_jobs/passthrough_schema.json)"
    )
    return Row(key, typ, default_text(f, {}), desc, passthrough=True)


def undocumented(root: type[BaseModel] = Recipe) -> list[str]:
    """Keys (as in the reference) of the fields without a description, pass-through mappings aside."""
    shared = shared_models(root)
    every = rows(root, "", shared)
    for m, ph in shared.items():
        every += rows(m, ph + ".", shared)
    return [r.key for r in every if not r.description.strip() and not r.passthrough]


def required_keys() -> list[str]:
    """Dotted keys every recipe must give (required fields reached through required fields only)."""
    out: list[str] = []

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, f in cls.model_fields.items():
            if not f.is_required():
                continue
            direct = [m for s, m in _models(f.annotation) if s == ""]
            if direct:
                for m in direct:
                    walk(m, f"{prefix}{name}.")
            else:
                out.append(f"{prefix}{name}")

    walk(Recipe, "")
    return out


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _prose(text: str) -> str:
    """A description as table text: pipes escaped, no HTML tags, no emphasis from ``*`` or a ``_``
    at a word's edge (``_work/``; an underscore inside a word is literal in GFM)."""
    text = text.replace("\\", "\\\\").replace("<", "&lt;").replace("*", "\\*")
    text = re.sub(r"(?<![\w\\])_|_(?!\w)", r"\\_", text)
    return _cell(text)


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


HEADER = "| Key | Type | Default | Description |\n| --- | --- | --- | --- |\n"


def _table(items: list[Row], shared: dict[type, str], link: Callable[[type], str]) -> str:
    names = {m.__name__: m for m in shared}
    lines = []
    for r in items:
        # a shared block is a link to its table; the rest of the type stays code
        groups: list[str] = []
        plain: list[str] = []
        for part in r.type.split(" | "):
            if part in names:
                groups += [f"`{_cell(' | '.join(plain))}`"] if plain else []
                groups.append(f"[{part}]({link(names[part])})")
                plain = []
            else:
                plain.append(part)
        groups += [f"`{_cell(' | '.join(plain))}`"] if plain else []
        typ = " \\| ".join(groups)
        lines.append(f"| `{_cell(r.key)}` | {typ} | {r.default} | {_prose(r.description)} |")
    return HEADER + "\n".join(lines) + "\n"


def _intro(sections: list[str], blocks: list[str], conditional: list[str]) -> str:
    pkg = json.loads(PACKAGED.read_text(encoding="utf-8"))["versions"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(pkg.items()))
    required = ", ".join(f"`{k}`" for k in required_keys())
    when = ", ".join(f"`{k}`" for k in conditional)
    toc = " · ".join(f"[{s}](#{_anchor(s)})" for s in sections)
    btoc = " · ".join(f"[{b}](#{_anchor(b)})" for b in blocks)
    return f"""\
# Recipe reference

<!-- Generated by scripts/gen_recipe_reference.py from the recipe's pydantic models. Do not edit. -->

Every key a recipe may set, with its type, default and meaning. This page is generated from the models
in `bezoar_jobs/recipe.py`, `recipe_base.py`, `recipe_training.py` and `recipe_eval.py` (each field's
`Field(description=...)`): do not edit it, change the model and run
`python scripts/gen_recipe_reference.py` (`--check` exits 1 when the page is stale). `tests/test_recipe.py`
fails when the page is stale or a field has no description.

- **Required** in every recipe: {required}.
- Everything else has a default, except the keys marked **required** inside a block, an optional
  section or a list entry, required wherever that block, section or entry is given: {when}.
- **Unknown keys are refused**: a misspelt key is an error naming its dotted path, the file and the
  line. Some rules span fields (a `tgi` or `openai-completions` endpoint needs `base_url` and
  `prompt_format`; `filter.method: logprobs` needs a `local` judge); their errors name the fields too.
- **Pass-through mappings** (`training.sft_args`, `training.stage_args`, `training.lora`,
  `training.dpo.dpo_args`, `training.dpo.lora`) are not modelled here: their keys are fields of TRL's
  `SFTConfig` / `DPOConfig` and PEFT's `LoraConfig`, laid over our defaults (shown) with `null` dropping
  one. `bezoar_jobs/passthrough.py` checks every key and its kind of value when the recipe loads,
  and refuses the keys a stage sets itself, against `bezoar_jobs/passthrough_schema.json` (or the
  installed classes, when their versions differ from the schema's: {versions}).
- **Examples**: [`recipes/openbezoar.yaml`](../recipes/openbezoar.yaml) (the paper; values the paper
  does not state are labelled `DEFAULT`) and [`recipes/demo.yaml`](../recipes/demo.yaml) (the CPU
  demo on the embedded SmolLM2-135M). [docs/recipe.md](recipe.md) sets the papers' choices beside
  ours, with the field that controls each departure.

Keys are dotted paths; `key[]` is each entry of a list. A model used at several places (an endpoint,
a decoding block, a dataset source, a template file) has one table, under
[Shared blocks](#shared-blocks), whose keys start with a placeholder (`<endpoint>.model` is
`teacher.model`, `judge.model` and `evaluation.mtbench.judge.model`); where such a block is a
default (or an entry of a list), only its fields that are set (not null or empty) are shown.
Defaults are JSON.

Sections: {toc}. Shared blocks: {btoc}.
"""


def render() -> str:
    shared = shared_models()
    places = uses()
    top = Recipe.model_fields

    def link(cls: type) -> str:
        return "#" + _anchor(cls.__name__)

    sections = ["Top level"]
    body: list[str] = []
    every: list[Row] = []
    top_rows = []
    for name, f in top.items():
        ann = f.annotation
        desc = f.description or ""
        if _is_section(ann, shared):
            desc += f" (table: [{name}](#{_anchor(name)}))"
        top_rows.append(Row(name, type_name(ann, shared, list(f.metadata)), default_text(f, shared), desc))
    body.append("## Top level\n\n" + _table(top_rows, shared, link))
    for name, f in top.items():
        section = [m for s, m in _models(f.annotation) if s == "" and m not in shared]
        if not section:
            continue
        sections.append(name)
        cls = section[0]
        doc = f"{f.description}."[0].upper() + f"{f.description}."[1:] if f.description else ""
        section_rows = rows(cls, f"{name}.", shared)
        every += section_rows
        body.append(f"## {name}\n\n{doc}\n\n" + _table(section_rows, shared, link))
    blocks = []
    shared_body = ["## Shared blocks\n"]
    for m, ph in shared.items():
        blocks.append(m.__name__)
        at = ", ".join(f"`{k}`" for k in places[m])
        what = " ".join((m.__doc__ or "").strip().split("\n\n")[0].split())
        lead = f"{_prose(what)} " if what else ""
        block_rows = rows(m, ph + ".", shared)
        every += block_rows
        table = _table(block_rows, shared, link)
        shared_body.append(f"### {m.__name__}\n\n{lead}`{ph}` is any of: {at}.\n\n{table}")
    always = set(required_keys())
    conditional = [r.key for r in every if r.default == "**required**" and r.key not in always]
    return _intro(sections, blocks, conditional) + "\n" + "\n".join(body) + "\n" + "\n".join(shared_body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when the reference is stale or a field has no description")
    a = ap.parse_args(argv)
    want = render()
    missing = undocumented()
    if missing:
        print("fields without a description: " + ", ".join(missing), file=sys.stderr)
    if a.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != want:
            print(f"{OUT} is stale: run scripts/gen_recipe_reference.py", file=sys.stderr)
            return 1
        return 1 if missing else 0
    OUT.write_text(want, encoding="utf-8")
    print(OUT.relative_to(REPO))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
