"""The recipe's pass-through sections checked when the recipe loads, before anything is spent.

``training.sft_args``, ``training.stage_args.*``, ``training.dpo.dpo_args``, ``training.lora`` and
``training.dpo.lora`` go to TRL's ``SFTConfig``/``DPOConfig`` and PEFT's ``LoraConfig``. The training
stage builds those classes (:mod:`bezoar_jobs.training.config`), but it runs after the data stages
have been paid for, so a typo (``training.lora.rr``) must fail ``bezoar plan``, ``bezoar run`` and
every stage as soon as the recipe is read: :func:`check_recipe` runs inside ``parse_recipe``.

It checks each key against a *schema* of the classes' fields: the field names, the kinds of value
each accepts (bool, int, float, str, list, dict, null) and, where the field is an enum or a
``Literal``, its choices (``optim``, ``lr_scheduler_type``, ``bias``), plus the keys the stage owns;
and the commonly set numbers against the ranges of :data:`BOUNDS` (a batch size of -3 or a negative
learning rate, which the classes themselves take). The schema is

- the one shipped with the package (``passthrough_schema.json``, built from the pinned TRL, PEFT
  and transformers) when those are the installed versions, or when they are not installed at all
  (the controller image);
- otherwise built from the installed classes themselves, once per set of versions, in a separate
  interpreter (importing TRL costs seconds and torch; the controller side never imports them), and
  cached in ``$BEZOAR_CACHE`` (default ``~/.cache/bezoar-jobs``).

The value checks of the classes' own ``__post_init__`` (combinations of settings) still run where
the stage builds the configs: ``bezoar plan`` and ``bezoar run`` also build every selected training
stage's configs when TRL is installed (:func:`build_all`).

``python -m bezoar_jobs.passthrough --write FILE`` writes the schema of the installed classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import types
import typing
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import BadInput
from .training.config import _OWNED_COMMON, _OWNED_DPO, _OWNED_LORA, _OWNED_PREFIXES, _OWNED_SFT, WRAPPED_REFUSED
from .yamlmodel import finite_problem

if TYPE_CHECKING:
    from .recipe import Recipe

log = logging.getLogger("bezoar")

PACKAGED = Path(__file__).with_name("passthrough_schema.json")
LIBRARIES = ("trl", "peft", "transformers")
CLASSES = {"SFTConfig": "trl:SFTConfig", "DPOConfig": "trl:DPOConfig", "LoraConfig": "peft:LoraConfig"}


# ---------------------------------------------------------------------------------------------
# the schema
# ---------------------------------------------------------------------------------------------
def installed_versions() -> dict[str, str] | None:
    """Versions of the libraries, read from their metadata (no import); None when any is missing."""
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            return None
    return out


def _kinds(tp: Any) -> tuple[set[str], list[Any] | None, bool]:  # noqa: ANN401 - a type annotation
    """(kinds of values, choices of a string value or None, whether a plain str is accepted)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        kinds: set[str] = set()
        choices: list[Any] = []
        plain = False
        for a in typing.get_args(tp):
            k, c, p = _kinds(a)
            kinds |= k
            choices += c or []
            plain = plain or p
        return kinds, choices or None, plain
    if origin is typing.Literal:
        vals = list(typing.get_args(tp))
        return {_kind_of(v) for v in vals}, [v for v in vals if isinstance(v, str)], False
    if tp is type(None) or tp is None:
        return {"null"}, None, False
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"str"}, [str(m.value) for m in tp], False
    base = origin or tp
    for name, t in (("bool", bool), ("int", int), ("float", float), ("str", str), ("list", list),
                    ("list", tuple), ("dict", dict)):
        if base is t:
            return {name}, None, name == "str"
    return set(), None, False  # Any, a class, a callable: not checked here


def _kind_of(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    return {int: "int", float: "float", str: "str"}.get(type(v), type(v).__name__)


def build_schema() -> dict[str, Any]:
    """The schema of the installed classes (imports TRL and PEFT)."""
    from .registry import load_attr

    out: dict[str, Any] = {"versions": installed_versions(), "classes": {}}
    for name, ref in CLASSES.items():
        cls = load_attr(ref)
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an unresolvable annotation somewhere: fall back to each field's own
            hints = {}
        fields: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            kinds, choices, _ = _kinds(hints.get(f.name, f.type))
            if "const" in f.metadata:  # a flag taking an optional value (TrainingArguments.fsdp=True)
                kinds.add(_kind_of(f.metadata["const"]))
            entry: dict[str, Any] = {"kinds": sorted(kinds)}
            # an enum beside a plain str (lr_scheduler_type: SchedulerType | str) is still converted
            # to the enum by the class: its values are the choices
            if choices and "str" in kinds:
                entry["choices"] = sorted(set(choices))
            fields[f.name] = entry
        out["classes"][name] = fields
    return out


def _cache_dir() -> Path:
    return Path(os.environ.get("BEZOAR_CACHE") or Path.home() / ".cache" / "bezoar-jobs").expanduser()


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    packaged: dict[str, Any] = json.loads(PACKAGED.read_text(encoding="utf-8"))
    versions = installed_versions()
    if versions is None or versions == packaged["versions"]:
        return packaged
    tag = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:16]
    cached = _cache_dir() / f"passthrough-{tag}.json"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        res = subprocess.run([sys.executable, "-m", "bezoar_jobs.passthrough", "--write", str(cached)],
                             capture_output=True, text=True, timeout=300)
        if res.returncode != 0 or not cached.is_file():
            log.warning("could not read the fields of the installed TRL/PEFT (%s); checking the recipe against "
                        "those of %s", (res.stderr.strip().splitlines() or ["?"])[-1], packaged["versions"])
            return packaged
    loaded: dict[str, Any] = json.loads(cached.read_text(encoding="utf-8"))
    return loaded


# ---------------------------------------------------------------------------------------------
# checking a recipe
# ---------------------------------------------------------------------------------------------
def problems(cls: str, args: dict[str, Any], path: str, owned: dict[str, str]) -> list[tuple[str, str]]:
    """``[(dotted path, what is wrong)]`` of one pass-through dict."""
    fields: dict[str, Any] = schema()["classes"][cls]
    out = []
    for key, value in args.items():
        where = f"{path}.{key}"
        if key in owned or key.startswith(_OWNED_PREFIXES):
            out.append((where, f"set by the stage, not the recipe ({owned.get(key, 'use training.push')})"))
            continue
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            out.append((where, f"unknown key: not a field of {cls}{hint}"))
            continue
        bad = _bad_value(value, fields[key]) or _out_of_range(key, value)
        if bad:
            out.append((where, bad))
    return out


class Range(NamedTuple):
    """The numbers a field takes: ``lo``/``hi`` (None: no limit), ``open_lo``/``open_hi``: the limit
    itself refused; ``also``: one value outside them that is allowed too (max_steps -1)."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    also: float | None = None

    def refuses(self, x: float) -> bool:
        if self.also is not None and x == self.also:
            return False
        low = self.lo is not None and (x <= self.lo if self.open_lo else x < self.lo)
        return low or (self.hi is not None and (x >= self.hi if self.open_hi else x > self.hi))

    def __str__(self) -> str:
        lo = f"{'above' if self.open_lo else 'at least'} {self.lo:g}" if self.lo is not None else ""
        hi = f"{'below' if self.open_hi else 'at most'} {self.hi:g}" if self.hi is not None else ""
        text = " and ".join(p for p in (lo, hi) if p)
        return f"{self.also:g} or {text}" if self.also is not None else text


_POSITIVE = Range(0, open_lo=True)
_COUNT = Range(1)
_FRACTION = Range(0, 1, open_hi=True)
# The commonly set numbers of SFTConfig, DPOConfig (TrainingArguments) and LoraConfig, which the
# classes take unchecked (a batch size of -3, a negative learning rate): checked wherever the key
# appears (sft_args, stage_args.*, dpo_args, lora, dpo.lora). Names as in TRL 1.16, transformers 5
# and PEFT 0.21 (no warmup_ratio: a warmup_steps below 1 is the ratio). Seeds, logging, save and
# eval steps are the stage's (training.config._OWNED_COMMON), refused before their values count.
BOUNDS: dict[str, Range] = {
    "per_device_train_batch_size": _COUNT,
    "gradient_accumulation_steps": _COUNT,
    "learning_rate": _POSITIVE,
    "num_train_epochs": _POSITIVE,
    "max_steps": Range(1, also=-1),  # -1: num_train_epochs decides
    "warmup_steps": Range(0),  # below 1: a ratio of the total steps
    "weight_decay": Range(0),
    "max_grad_norm": Range(0),
    "adam_beta1": _FRACTION,
    "adam_beta2": _FRACTION,
    "adam_epsilon": _POSITIVE,
    "label_smoothing_factor": _FRACTION,
    "max_length": _COUNT,
    "dataloader_num_workers": Range(0),
    "dataset_num_proc": _COUNT,
    "torch_empty_cache_steps": _COUNT,
    # DPOConfig
    "beta": _POSITIVE,
    "label_smoothing": Range(0, 0.5, open_hi=True),  # a probability that a label is flipped (TRL's docs)
    "ref_model_mixup_alpha": Range(0, 1),
    "ref_model_sync_steps": _COUNT,
    # LoraConfig
    "r": _COUNT,
    "lora_alpha": _POSITIVE,
    "lora_dropout": _FRACTION,
}


def _out_of_range(key: str, value: object) -> str | None:
    """The problem of a number outside BOUNDS[key] (a kind of value the field takes, already checked)."""
    bounds = BOUNDS.get(key)
    if bounds is None or value is None or isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)  # YAML 1.1 reads 2e-4 as text
    except ValueError:
        return None
    return f"{value} is out of range: must be {bounds}" if bounds.refuses(number) else None


def _bad_value(value: object, field: dict[str, Any]) -> str | None:
    kinds = set(field.get("kinds") or ())
    if not kinds:
        return None
    kind = _kind_of(value)
    if kinds - {"null"} == {"bool"} and kind != "bool":
        return f"expected true or false, got {value!r}"
    if kind == "bool" and "bool" not in kinds and kinds & {"int", "float"}:
        return f"expected a number, got {value!r}"
    if kind in kinds or (kind == "int" and "float" in kinds):
        if kind == "str" and field.get("choices") and value not in field["choices"]:
            near = difflib.get_close_matches(str(value), field["choices"], n=1)
            return f"{value!r} is not one of its choices" + (f" (did you mean {near[0]!r}?)" if near else "")
        return None
    if kind == "str" and kinds & {"int", "float"}:
        try:  # YAML 1.1 leaves 2e-4 a string; the stage converts it
            number = float(str(value))
        except ValueError:
            return f"{value!r} is not a number"
        return None if math.isfinite(number) else f"{value!r}: {finite_problem(number)}"
    if kind == "float" and "int" in kinds:
        return f"expected an integer, got {value!r}"
    want = " or ".join(sorted(k if k != "null" else "null" for k in kinds))
    return f"expected {want}, got {value!r}"


def recipe_problems(recipe: Recipe) -> list[tuple[str, str]]:
    t = recipe.training
    sft_owned = {**_OWNED_COMMON, **_OWNED_SFT}
    out: list[tuple[str, str]] = []
    stage_sections = ((f"training.stage_args.{s}", a) for s, a in t.stage_args.items())
    for where, args in [("training.sft_args", t.sft_args), *stage_sections]:
        out += problems("SFTConfig", dict(args), where, sft_owned)
        if t.batching != "packed" and "packing_strategy" in args:
            out.append((f"{where}.packing_strategy", "only used with training.batching: packed"))
        elif args.get("packing_strategy") == "wrapped":  # training/sft.make_trainer refuses it too
            out.append((f"{where}.packing_strategy", WRAPPED_REFUSED))
    out += problems("DPOConfig", dict(t.dpo.dpo_args), "training.dpo.dpo_args", {**_OWNED_COMMON, **_OWNED_DPO})
    out += problems("LoraConfig", dict(t.lora), "training.lora", _OWNED_LORA)
    if t.dpo.lora is not None:
        out += problems("LoraConfig", dict(t.dpo.lora), "training.dpo.lora", _OWNED_LORA)
    for stage in [*t.sft_stage_names(), "sft-hh"]:
        if not t.stage_sft_args(stage).get("max_length"):
            where = f"training.stage_args.{stage}" if t.stage_args.get(stage) else "training.sft_args"
            out.append((f"{where}.max_length", "must be set (the stage tokenizes and cuts examples to it)"))
            break
    if not t.dpo.dpo_args.get("max_length"):
        out.append(("training.dpo.dpo_args.max_length", "must be set (prompts longer than it are refused or dropped)"))
    return out


def check_recipe(recipe: Recipe, lines: dict[tuple[Any, ...], int], source: str) -> None:
    """BadInput naming file, line and dotted path of every problem of the pass-through sections."""
    found = recipe_problems(recipe)
    if not found:
        return
    located = []
    for dotted, msg in found:
        loc = tuple(dotted.split("."))
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        located.append((line or 0, f"{source}:{line}: {dotted}: {msg}" if line else f"{source}: {dotted}: {msg}"))
    out = [text for _, text in sorted(located)]
    if len(out) == 1:
        raise BadInput(f"invalid recipe: {out[0]}")
    raise BadInput("invalid recipe:\n  " + "\n  ".join(out))


def build_all(recipe: Recipe, stages: list[str]) -> None:
    """Build the TRL/PEFT configs of every selected training stage with the installed classes (their
    own value checks included), for a CUDA plan validated on this machine; nothing when TRL is not
    installed. BadInput naming the recipe path on the first refusal."""
    if installed_versions() is None:
        return
    import tempfile

    from .registry import STAGES
    from .training.config import build_stage_configs, device_plan

    training = [s for s in stages if STAGES[s].family in ("sft", "dpo")]
    if not training:
        return
    plan = device_plan(recipe.training, cuda=True, bf16_ok=True)  # what a GPU would build (validated here)
    with tempfile.TemporaryDirectory(prefix="bezoar-check-") as tmp:
        for stage in training:
            build_stage_configs(recipe.training, recipe.seed, stage, Path(tmp), plan=plan)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="write the field schema of the installed TRL/PEFT config classes")
    ap.add_argument("--write", required=True, metavar="FILE")
    a = ap.parse_args(argv)
    path = Path(a.write)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(build_schema(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
