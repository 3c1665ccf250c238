"""The stage registry: every stage of the recipe is declared here, once.

A declaration says what the rest of the project needs to know about a stage:

- ``run``: the stage function (``module:function``, imported only when the stage runs);
- ``inputs``: the stages whose committed outputs it reads (the default graph; the training chain
  and the evaluated checkpoints follow the recipe, see :func:`bezoar_jobs.pipeline.stage_inputs`);
- ``reads``: the recipe fields (dotted paths) it reads. Its parameter hash covers exactly these,
  and the runner hands the stage a view of the recipe that refuses every other field
  (:mod:`bezoar_jobs.recipe_view`), so a stage cannot read a setting its hash leaves out;
- ``unhashed``: fields it may read that do not change what it commits (progress-file cadence,
  checkpoint cadence, loggers, labels), each family's reason given where it is declared;
- ``pod``: which pod class sizes its Kubernetes Job (``data``, ``train``, ``eval``, ``report``: the
  report renders files from the run and needs no GPU);
- ``needs``: the servers it talks to (``teacher``, ``judge``);
- ``reads_whole_run``: it reads whatever is committed (the report), so it runs after every other
  selected stage and is current only while nothing else changed.

The runner, the schedulers (local and Kubernetes), the cluster settings, ``bezoar plan``, the report,
the CLI's stage choices and ``make manifests`` all derive from this table. A generation scheme is
one :class:`Scheme` line below plus its own module under ``bezoar_jobs/schemes/`` (generation, what
the judge sees, the SFT columns, the plan's estimate); an evaluation is one :class:`Evaluation`
line plus its module (the stage, its report section). See CONTRIBUTING.md.

This module imports nothing heavy and nothing else of the package but ``errors``: the controller,
the recipe and the CLI all import it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from .errors import BadInput

if TYPE_CHECKING:
    from .recipe import Recipe

Family = Literal["generate", "filter", "sft", "dpo", "evaluate", "report"]
PodClass = Literal["data", "train", "eval", "report"]
POD_CLASSES: tuple[PodClass, ...] = ("data", "train", "eval", "report")


def load_attr(ref: str) -> Any:  # noqa: ANN401 - whatever the named module holds
    """``"package.module:name"`` -> the object (imports the module)."""
    mod, _, name = ref.partition(":")
    return getattr(importlib.import_module(mod), name)


# ---------------------------------------------------------------------------------------------
# Generation schemes
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scheme:
    """A generation scheme: ``generate-<name>`` -> ``filter-<name>`` -> ``sft-<name>``.

    ``module`` provides ``generate(ctx)`` (the generate stage), ``judge_pair(row, recipe)``
    (the instruction and response the filter's judge sees, reading only ``filter_reads``),
    ``judge_tokens(recipe)`` (their typical size, for the filter's estimate), ``TRAIN_COLUMNS``
    (instruction, response and system columns the SFT stage trains on), ``expected_rows(recipe)``
    and ``estimate(recipe, store, stage)`` (the plan's request estimate).
    ``seed`` is the recipe field of its seed data; ``reads`` the other recipe fields its generation
    reads besides ``seed``, ``teacher``, its seed data and ``generation.<name>``.
    """

    name: str
    module: str
    seed: str
    reads: tuple[str, ...] = ()
    needs: tuple[str, ...] = ("teacher",)
    description: str = ""
    # recipe fields its judge_pair(row, recipe) reads: the filter stage declares them
    filter_reads: tuple[str, ...] = ()

    @property
    def section(self) -> str:
        return f"generation.{self.name}"

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


SCHEMES: tuple[Scheme, ...] = (
    Scheme("lamini", "bezoar_jobs.schemes.lamini", "seeds.dolly",
           description="LaMini-LM: example- and topic-guided instructions, then responses"),
    # its elimination rule 1 asks the judge whether an evolution adds anything, with the filter's
    # decoding settings (cut to a few tokens)
    Scheme("evol", "bezoar_jobs.schemes.evol", "seeds.dolly", reads=("judge", "filter.decoding"),
           needs=("teacher", "judge"), description="WizardLM Evol-Instruct over dolly-15k"),
    # its judge is shown the Flan target when generation.orca.judge_sees_target says so
    Scheme("orca", "bezoar_jobs.schemes.orca", "seeds.flan", filter_reads=("generation.orca.judge_sees_target",),
           description="Orca explanation tuning over the Flan Collection"),
)
SCHEME_NAMES: tuple[str, ...] = tuple(s.name for s in SCHEMES)

# The default order of the scheme SFT stages (training.sft_order): the OpenBezoar model card lists
# lamini, orca, evol, and the authors' own intermediate checkpoint is named
# open-llama-v2-lamini-orca-evol-qlora-checkpoint (docs/recipe.md). A scheme not named here trains
# after these, in SCHEMES order. The canonical order (SCHEMES order) is what --from/--until cut and
# `bezoar status` lists; the training chain follows this order (or the recipe's).
_PAPER_SFT_ORDER: tuple[str, ...] = ("lamini", "orca", "evol")
DEFAULT_SFT_ORDER: tuple[str, ...] = (
    *(n for n in _PAPER_SFT_ORDER if n in SCHEME_NAMES),
    *(n for n in SCHEME_NAMES if n not in _PAPER_SFT_ORDER),
)


def scheme(name: str) -> Scheme:
    for s in SCHEMES:
        if s.name == name:
            return s
    raise BadInput(f"unknown generation scheme {name!r}; schemes are: {', '.join(SCHEME_NAMES)}")


# ---------------------------------------------------------------------------------------------
# Evaluations
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    """An evaluation stage ``eval-<name>``: ``module`` provides ``run(ctx)`` (the stage) and
    ``report_section(results, read, shown)`` (its part of the run report) and, when it sends API
    requests, ``estimate(recipe, store, stage)``; ``section`` is its recipe section
    (``evaluation.<name>``); ``reads`` further recipe fields it reads."""

    name: str
    module: str
    results_file: str  # the committed results file its report section reads
    reads: tuple[str, ...] = ()
    sends_requests: bool = False  # its module has estimate(recipe, store, stage) for `bezoar plan`
    needs: tuple[str, ...] = ()
    title: str = ""

    @property
    def stage(self) -> str:
        return f"eval-{self.name}"

    @property
    def section(self) -> str:
        return f"evaluation.{self.name}"

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


EVALUATIONS: tuple[Evaluation, ...] = (
    Evaluation("harness", "bezoar_jobs.stages.eval_harness", "results/summary.json",
               title="Evaluation: LM Evaluation Harness"),
    # the MT-Bench judge is evaluation.mtbench.judge, or the recipe's judge when that is null
    Evaluation("mtbench", "bezoar_jobs.stages.eval_mtbench", "results/scores.json", reads=("judge",),
               needs=("judge",), sends_requests=True, title="Evaluation: MT-Bench"),
)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageDef:
    name: str
    family: Family
    run: str  # "module:function"
    inputs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    unhashed: tuple[str, ...] = ()
    pod: PodClass = "data"
    needs: tuple[str, ...] = ()
    reads_whole_run: bool = False
    shardable: bool = False
    # the recipe decides the inputs (training chain, evaluated checkpoints): recipe -> inputs
    dynamic_inputs: Callable[[Recipe], tuple[str, ...]] | None = field(default=None, compare=False)
    scheme: str | None = None  # generate/filter/sft stages of a scheme
    evaluation: str | None = None  # evaluation stages
    # "module:function" of the stage's request estimate for `bezoar plan` (None: it sends no requests)
    estimate: str | None = None

    @property
    def readable(self) -> tuple[str, ...]:
        """Every recipe field the stage may read: hashed or not, and the recipe's labels."""
        return (*self.reads, *self.unhashed, *LABELS)

    def function(self) -> Callable[..., Any]:
        fn: Callable[..., Any] = load_attr(self.run)
        return fn


# Read by every stage, hashed by none: the recipe's name and description label outputs (dataset and
# model cards, manifests) and never change what a stage computes; renaming a recipe reruns nothing.
LABELS: tuple[str, ...] = ("name", "description")

# Data stages write their progress (teacher and judge answers) in part files of this many records:
# how often they are flushed does not change any answer. The failed-request limit is a gate, not a
# parameter: it decides whether a stage commits, never what it commits (a committed stage lost at most
# the fraction of the day it ran), and hashing it would discard every paid-for record in _work/.
_DATA_UNHASHED: tuple[str, ...] = ("generation.flush_every", "generation.max_failed_fraction")

# The training stages' reads. Checkpoint cadence, loggers and hub upload are left out of the hash on
# purpose: they do not change the trained weights, so changing them neither reruns a stage nor
# discards its checkpoints.
_TRAINING_COMMON: tuple[str, ...] = (
    "seed",
    "student",
    "training.sft_order",
    "training.quantization",
    "training.bnb_compute_dtype",
    "training.precision",
    "training.merge_dtype",
    "training.long_prompts",
    "training.max_dropped_fraction",
    "training.base_licence",
    "training.lora",
    "training.attention",
    "training.shared_prefix",
    "training.response_head",
)
_TRAINING_UNHASHED: tuple[str, ...] = (
    "training.checkpoint_every",
    "training.keep_checkpoints",
    "training.report_to",
    "training.push",
)
_SFT_READS: tuple[str, ...] = (*_TRAINING_COMMON, "training.batching", "training.sft_args", "training.stage_args")


def default_sft_order() -> tuple[str, ...]:
    """DEFAULT_SFT_ORDER over the schemes declared now (a scheme added to SCHEMES trains last)."""
    names = [s.name for s in SCHEMES]
    return (*(n for n in _PAPER_SFT_ORDER if n in names), *(n for n in names if n not in _PAPER_SFT_ORDER))


def _training_chain(recipe: Recipe | None) -> list[str]:
    order = getattr(getattr(recipe, "training", None), "sft_order", None) or default_sft_order()
    return [f"sft-{x}" for x in order]


def last_sft_stage(recipe: Recipe | None) -> str:
    """The last scheme SFT stage of the training chain: its model is OpenBezoar-SFT."""
    return _training_chain(recipe)[-1]


def _sft_inputs(name: str) -> Callable[[Recipe], tuple[str, ...]]:
    def inputs(recipe: Recipe) -> tuple[str, ...]:
        chain = _training_chain(recipe)
        if name == "sft-hh":
            return (chain[-1],)
        i = chain.index(name)
        return (f"filter-{name[4:]}",) + ((chain[i - 1],) if i else ())

    return inputs


# the checkpoint name that stands for the last scheme SFT stage (OpenBezoar-SFT), whatever the order
SFT_ALIAS = "sft"


def resolve_checkpoint(name: str, recipe: Recipe | None) -> str:
    """A name of evaluation.checkpoints as a stage name: ``sft`` is the last scheme SFT stage."""
    return last_sft_stage(recipe) if name == SFT_ALIAS else name


def _evaluated(recipe: Recipe) -> tuple[str, ...]:
    listed = getattr(getattr(recipe, "evaluation", None), "checkpoints", None) or ()
    checkpoints = {resolve_checkpoint(n, recipe) for n in listed}
    return tuple(n for n in _trained() if n in checkpoints)


def _trained() -> tuple[str, ...]:
    return (*(f"sft-{s.name}" for s in SCHEMES), "sft-hh", "dpo")


def _build() -> tuple[StageDef, ...]:
    chain = _training_chain(None)
    out: list[StageDef] = []
    for s in SCHEMES:
        out.append(StageDef(
            f"generate-{s.name}", "generate", f"{s.module}:generate",
            reads=("seed", "teacher", s.seed, s.section, *s.reads), unhashed=_DATA_UNHASHED,
            needs=s.needs, shardable=True, scheme=s.name, estimate=f"{s.module}:estimate",
        ))
    for s in SCHEMES:
        out.append(StageDef(
            f"filter-{s.name}", "filter", "bezoar_jobs.stages.filter:run_filter", inputs=(f"generate-{s.name}",),
            # the seed data's licence goes into the filtered dataset's card
            reads=("seed", "judge", "filter", f"{s.seed}.licence", *s.filter_reads), unhashed=_DATA_UNHASHED,
            needs=("judge",), scheme=s.name, estimate="bezoar_jobs.stages.filter:estimate",
        ))
    for s in SCHEMES:
        name = f"sft-{s.name}"
        i = chain.index(name)
        out.append(StageDef(
            name, "sft", "bezoar_jobs.stages.sft:run_sft",
            inputs=(f"filter-{s.name}",) + ((chain[i - 1],) if i else ()),
            # the model card names the seed data's licence and the teacher and judge that wrote the data
            reads=(*_SFT_READS, f"{s.seed}.licence", "teacher.model", "judge.model"),
            unhashed=_TRAINING_UNHASHED, pod="train", dynamic_inputs=_sft_inputs(name), scheme=s.name,
        ))
    out.append(StageDef(
        "sft-hh", "sft", "bezoar_jobs.stages.sft:run_sft", inputs=(chain[-1],),
        reads=(*_SFT_READS, "training.hh"), unhashed=_TRAINING_UNHASHED, pod="train",
        dynamic_inputs=_sft_inputs("sft-hh"),
    ))
    out.append(StageDef(
        "dpo", "dpo", "bezoar_jobs.stages.dpo:run_dpo", inputs=("sft-hh",),
        reads=(*_TRAINING_COMMON, "training.hh", "training.dpo"), unhashed=_TRAINING_UNHASHED, pod="train",
    ))
    for ev in EVALUATIONS:
        out.append(StageDef(
            ev.stage, "evaluate", f"{ev.module}:run",
            inputs=tuple(n for n in _trained() if n in {resolve_checkpoint(c, None) for c in DEFAULT_CHECKPOINTS}),
            # training.sft_order: which stage the checkpoint name "sft" (OpenBezoar-SFT) stands for
            reads=("seed", "student", "evaluation.checkpoints", "evaluation.baselines", "evaluation.dtype",
                   "evaluation.device", "training.sft_order", ev.section, *ev.reads),
            pod="eval", needs=ev.needs, dynamic_inputs=_evaluated, evaluation=ev.name,
            estimate=f"{ev.module}:estimate" if ev.sends_requests else None,
        ))
    out.append(StageDef("report", "report", "bezoar_jobs.stages.report:run_report", reads=("report",),
                        pod="report", reads_whole_run=True))
    return tuple(out)


# the training stages whose committed model/ can be evaluated, in canonical order
_TRAINED: tuple[str, ...] = _trained()
# the evaluation's default checkpoints after the base model (recipe_eval.EvaluationConfig.checkpoints):
# OpenBezoar-SFT (the last scheme SFT stage), -HH-RLHF-SFT and -HH-RLHF-DPO
DEFAULT_CHECKPOINTS: tuple[str, ...] = (SFT_ALIAS, "sft-hh", "dpo")

STAGES_LIST: tuple[StageDef, ...] = _build()
# the canonical order: what --from/--until cut (inclusive) and `bezoar status` lists
CANONICAL: tuple[str, ...] = tuple(s.name for s in STAGES_LIST)
STAGES: dict[str, StageDef] = {s.name: s for s in STAGES_LIST}
TRAINED_STAGES: tuple[str, ...] = _TRAINED
SFT_STAGES: tuple[str, ...] = tuple(n for n in _TRAINED if STAGES[n].family == "sft")


def check(stages: tuple[StageDef, ...]) -> list[str]:
    """What is wrong with a stage table (empty: nothing): names unique; every input a declared stage;
    families, pod classes and servers known;
    a scheme's or an evaluation's stages named after it; a whole-run reader declares no inputs; the inputs
    form no cycle. (The canonical order need not be a topological order: the default training chain
    is lamini, orca, evol while the canonical order lists sft-evol before sft-orca.)"""
    problems: list[str] = []
    seen: list[str] = []
    names = {s.name for s in stages}
    families = ("generate", "filter", "sft", "dpo", "evaluate", "report")
    for s in stages:
        if s.name in seen:
            problems.append(f"{s.name}: declared twice")
        for inp in s.inputs:
            if inp not in names:
                problems.append(f"{s.name}: input {inp!r} is not a declared stage")
        if s.family not in families:
            problems.append(f"{s.name}: unknown family {s.family!r}")
        if s.pod not in POD_CLASSES:
            problems.append(f"{s.name}: unknown pod class {s.pod!r}")
        for n in s.needs:
            if n not in ("teacher", "judge"):
                problems.append(f"{s.name}: unknown server {n!r}")
        if s.scheme is not None and not s.name.endswith(f"-{s.scheme}"):
            problems.append(f"{s.name}: a stage of scheme {s.scheme!r} is named <family>-{s.scheme}")
        if s.evaluation is not None and s.name != f"eval-{s.evaluation}":
            problems.append(f"{s.name}: evaluation {s.evaluation!r} runs as stage eval-{s.evaluation}")
        if s.reads_whole_run and s.inputs:
            problems.append(f"{s.name}: reads the whole run, so it declares no inputs")
        overlap = set(s.reads) & set(s.unhashed)
        if overlap:
            problems.append(f"{s.name}: {sorted(overlap)} both hashed and unhashed")
        seen.append(s.name)
    cycle = _cycle({s.name: tuple(i for i in s.inputs if i in names) for s in stages})
    if cycle:
        problems.append(f"the inputs form a cycle: {' -> '.join(cycle)}")
    return problems


def _cycle(graph: dict[str, tuple[str, ...]]) -> list[str]:
    """A cycle of the input graph (stage -> its inputs) as a list of names, or [] when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        path.append(n)
        for m in graph.get(n, ()):
            if state.get(m) == 1:
                return [*path[path.index(m):], m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return []

    for n in graph:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def spec(name: str) -> StageDef:
    try:
        return STAGES[name]
    except KeyError:
        raise BadInput(f"unknown stage {name!r}; stages are: {', '.join(CANONICAL)}") from None


def stages_of(family: Family) -> tuple[str, ...]:
    return tuple(s.name for s in STAGES_LIST if s.family == family)


_PROBLEMS = check(STAGES_LIST)
if _PROBLEMS:  # pragma: no cover - a broken table is a programming error, caught at import
    raise RuntimeError("bezoar_jobs.registry: " + "; ".join(_PROBLEMS))
