"""The typed recipe: one pydantic v2 object loaded from YAML, unknown keys refused.

Every validation error names the dotted path of the field, the file and, where the YAML parser can
tell, the line. The run location is not part of the recipe (it is ``--run``); secrets are never in
the recipe (only the *names* of environment variables or mounted files that hold them).

Values the OpenBezoar paper does not state are defaults labelled in recipes/openbezoar.yaml.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_core import to_jsonable_python

from .errors import BadInput
from .passthrough import check_recipe
from .recipe_base import (
    Bool,
    DatasetSource,
    Decoding,
    Endpoint,
    Float,
    NonNegInt,
    PosInt,
    Prob,
    Seed,
    Strict,
    check_anthropic_temperatures,
    is_hub_model,
)
from .recipe_eval import EvaluationConfig, ReportConfig
from .recipe_training import TrainingConfig
from .registry import SFT_ALIAS, resolve_checkpoint
from .yamlmodel import key_lines, parse_yaml, validate

SCHEMA_VERSION = 1


class StudentModel(Strict):
    model: str = Field(description="hub id, local/s3 checkpoint directory, or pkg://package/file.gguf")
    revision: str | None = Field(None, description="pinned hub revision (commit sha) of the model")
    trust_remote_code: Bool = Field(
        False,
        description="run code shipped with the model repo (transformers trust_remote_code) when loading the student, "
        "the checkpoints trained from it and their tokenizers",
    )
    add_bos: Bool = Field(
        True,
        description="put the tokenizer's BOS token in front of every training example, DPO prompt and MT-Bench "
        "answer prompt when the tokenizer does not add one itself",
    )


# ---------------------------------------------------------------------------------------------
# Seed data
# ---------------------------------------------------------------------------------------------
class TemplateRef(Strict):
    """A prompt template file: pkg://bezoar_jobs/templates/<name> (ours) or a user file."""

    path: str = Field(description="a file: pkg://bezoar_jobs/templates/<name>, a local path, file:// or s3://")


# ---------------------------------------------------------------------------------------------
# Generation schemes
# ---------------------------------------------------------------------------------------------
class LaminiConfig(Strict):
    seed_data: Literal["dolly"] = Field("dolly", description="the seed data, seeds.dolly (the only choice)")
    example_prompts: NonNegInt = Field(50, description="example-guided generation prompts")
    topic_prompts: NonNegInt = Field(25, description="topic-guided generation prompts")
    examples_per_prompt: PosInt = Field(
        3, description="seed instructions sampled as examples into each prompt (the topic proposals' too)"
    )
    topics_per_prompt: PosInt = Field(3, description="topics sampled into each topic-guided prompt")
    instructions_per_prompt: PosInt = Field(20, description="new instructions each prompt asks for ({n})")
    topics: DatasetSource | None = Field(
        None,
        description="a file of topics (column 'topic'); null: the teacher proposes topics per dolly category "
        "in a first phase (checked and deduplicated, saved with the stage's output)",
    )
    topics_per_category: PosInt = Field(20, description="topics asked of the teacher per dolly category")
    topic_max_words: PosInt = Field(3, description="a proposed topic has 1 to this many words (LaMini: short names)")
    topic_list_template: TemplateRef = Field(
        TemplateRef(path="pkg://bezoar_jobs/templates/lamini_topics.txt"),
        description="the topic-proposal prompt: {category} {examples} {n}",
    )
    topic_decoding: Decoding = Field(
        Decoding(max_new_tokens=256, temperature=0.7, top_p=0.9), description="the teacher's topic proposals"
    )
    example_template: TemplateRef = Field(
        TemplateRef(path="pkg://bezoar_jobs/templates/lamini_example.txt"),
        description="the example-guided prompt: {examples} {n}",
    )
    topic_template: TemplateRef = Field(
        TemplateRef(path="pkg://bezoar_jobs/templates/lamini_topic.txt"),
        description="the topic-guided prompt: {examples} {topics} {n}",
    )
    response_template: TemplateRef = Field(
        TemplateRef(path="pkg://bezoar_jobs/templates/response.txt"),
        description="the prompt asking for an instruction's response: {instruction}",
    )
    instruction_decoding: Decoding = Field(
        Decoding(max_new_tokens=1024, temperature=0.7, top_p=0.9),
        description="the teacher's instruction lists (example- and topic-guided prompts)",
    )
    response_decoding: Decoding = Field(
        Decoding(max_new_tokens=512, temperature=0.3, repetition_penalty=1.2), description="the teacher's responses"
    )
    min_instruction_words: PosInt = Field(3, description="a parsed instruction with fewer words is dropped")
    max_instructions: PosInt | None = Field(None, description="cap on instructions sent for responses")

    @model_validator(mode="after")
    def _some_prompts(self) -> LaminiConfig:
        if self.example_prompts + self.topic_prompts == 0:
            raise ValueError("example_prompts and topic_prompts are both 0: the stage would have nothing to ask")
        return self


EvolOperation = Literal["constraints", "deepen", "concretize", "reasoning", "complicate_input"]


class EvolConfig(Strict):
    seed_data: Literal["dolly"] = Field("dolly", description="the seed data, seeds.dolly (the only choice)")
    seeds: PosInt = Field(1000, description="dolly instructions that start the pool")
    rounds: PosInt = Field(4, description="evolution rounds (WizardLM default; unknown for OpenBezoar)")
    in_depth_weight: Prob | None = Field(
        None,
        description="probability of an in-depth step versus in-breadth; null: every prompt (each depth operation "
        "and breadth) equally likely, as WizardLM's code picks among its five prompts (in-depth 0.8)",
    )
    depth_operations: tuple[EvolOperation, ...] = Field(
        ("constraints", "deepen", "concretize", "reasoning"),
        description="in-depth operations (WizardLM's released code); add complicate_input for the paper's fifth",
    )
    templates_dir: str = Field("pkg://bezoar_jobs/templates/evol", description="one file per operation")
    response_template: TemplateRef = Field(
        TemplateRef(path="pkg://bezoar_jobs/templates/response.txt"),
        description="the prompt asking for an evolved instruction's response: {instruction}",
    )
    equality_template: TemplateRef = Field(
        TemplateRef(path="pkg://bezoar_jobs/templates/evol_equal.txt"),
        description="rule 1: the judge's prompt comparing an instruction with its evolution: {first} {second} "
        "(decoding: filter.decoding, cut to 8 new tokens)",
    )
    evolve_decoding: Decoding = Field(
        Decoding(max_new_tokens=512, temperature=0.7, top_p=0.9), description="the teacher's evolutions"
    )
    response_decoding: Decoding = Field(
        Decoding(max_new_tokens=512, temperature=0.3, repetition_penalty=1.2), description="the teacher's responses"
    )
    equality_check: Bool = Field(True, description="rule 1: the judge says the evolution adds nothing")
    sorry_max_words: PosInt = Field(80, description="rule 2: 'sorry' in a response shorter than this")
    leak_phrases: tuple[str, ...] = Field(
        (
            # the words of our own templates (their labels, "Task:", "New task:", "Invented task:", are
            # found in the template files themselves and checked too)
            "new task",
            "invented task",
            "rewritten task",
            "given task",
            "the task below",
            "original task",
            # WizardLM's markers, for its prompt files dropped in
            "#rewritten prompt#",
            "rewritten prompt",
            "given prompt",
            "#given prompt#",
            "#created prompt#",
            "created prompt",
        ),
        description="rule 4: the evolved instruction copies the rewriting prompt's own words",
    )

    @field_validator("depth_operations")
    @classmethod
    def _ops(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError("an operation is listed twice")
        return v


Submix = Literal["cot", "niv2", "t0", "flan2021"]

# Orca's FLAN-v2 sample (Orca paper, Table 3): CoT 150K, NIv2 440K, T0 2M, Flan 2021 2.5M queries
ORCA_SUBMIX_WEIGHTS: dict[str, float] = {"cot": 150_000, "niv2": 440_000, "t0": 2_000_000, "flan2021": 2_500_000}


class OrcaConfig(Strict):
    seed_data: Literal["flan"] = Field("flan", description="the seed data, seeds.flan (the only choice)")
    seeds: PosInt = Field(1000, description="Flan rows sampled as seeds, split between the sub-mixes by submix_weights")
    system_messages: DatasetSource = Field(
        DatasetSource(path="pkg://bezoar_jobs/templates/orca_system_messages.jsonl", licence="Apache-2.0"),
        description="one message per row: id, text, submixes (where it is drawn: cot, niv2, t0, flan2021, and "
        "flan2021_mc for Flan 2021 multiple-choice rows); ours follow Orca's 16 and its mapping",
    )
    submix_weights: dict[Submix, Annotated[Float, Field(ge=0)]] = Field(
        default_factory=lambda: dict(ORCA_SUBMIX_WEIGHTS),  # type: ignore[arg-type]
        description="share of the seeds per sub-mix (relative numbers); default Orca's sample sizes",
    )
    template_types: tuple[str, ...] = Field(
        ("zs_opt", "zs_noopt"),
        description="Flan template_type values sampled; default zero-shot only, as Orca; () samples every template",
    )
    sampling: Literal["reservoir", "shuffle_buffer"] = Field(
        "reservoir",
        description="reservoir: an exact uniform sample per sub-mix in one full pass; shuffle_buffer: stop early, "
        "as random as the buffer allows (bezoar_jobs/data/sampling.py)",
    )
    shuffle_buffer_size: PosInt = Field(10_000, description="rows in the shuffle buffer (sampling: shuffle_buffer)")
    show_gold_target: Bool = Field(
        False, description="the teacher sees the Flan target (gold_response_template); unknown in the paper"
    )
    response_template: TemplateRef = Field(
        TemplateRef(path="pkg://bezoar_jobs/templates/orca_response.txt"),
        description="the teacher's prompt (after the sampled system message): {inputs}",
    )
    gold_response_template: TemplateRef = Field(
        TemplateRef(path="pkg://bezoar_jobs/templates/orca_response_gold.txt"),
        description="the teacher's prompt when show_gold_target: {inputs} and {targets}",
    )
    judge_sees_target: Bool = Field(
        True, description="the filter's judge is shown the Flan target as a reference answer"
    )
    response_decoding: Decoding = Field(
        Decoding(max_new_tokens=768, temperature=0.3, repetition_penalty=1.2), description="the teacher's explanations"
    )

    @field_validator("submix_weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        if not any(w > 0 for w in v.values()):
            raise ValueError("at least one sub-mix needs a weight above 0")
        return v


class GenerationConfig(Strict):
    lamini: LaminiConfig = Field(LaminiConfig(), description="generate-lamini: LaMini-LM instructions and responses")
    evol: EvolConfig = Field(EvolConfig(), description="generate-evol: WizardLM Evol-Instruct over dolly")
    orca: OrcaConfig = Field(OrcaConfig(), description="generate-orca: Orca explanations over the Flan Collection")
    flush_every: PosInt = Field(16, description="records per _work part file while generating")
    max_failed_fraction: Prob = Field(
        0.01,
        description="a request phase of a generate or filter stage that loses more than this fraction of its "
        "requests (failed for good, or an answer that stays unparseable) fails the stage (retryable) instead of "
        "committing without them; every loss is counted in the manifest either way",
    )


class SeedsConfig(Strict):
    dolly: DatasetSource = Field(
        DatasetSource(path="databricks/databricks-dolly-15k", licence="CC-BY-SA-3.0"),
        description="seeds of generate-lamini and generate-evol: columns instruction, context, response, category",
    )
    flan: DatasetSource = Field(
        DatasetSource(path="SirNeural/flan_v2", licence="Apache-2.0 (mixed sources)"),
        description="seeds of generate-orca (the Flan Collection): columns inputs, targets, task_source, task_name, "
        "template_type",
    )


# ---------------------------------------------------------------------------------------------
# Filtering
# ---------------------------------------------------------------------------------------------
class FilterConfig(Strict):
    judge_name: Annotated[str, Field(pattern=r"^[a-z0-9_]+$")] = Field(
        "gpt4", description="prefix of the verdict columns: {judge_name}_status/_rating/_reason"
    )
    method: Literal["generate", "logprobs"] = Field(
        "generate",
        description="generate: parse a JSON verdict; logprobs: rate from rating-token probabilities (local judge)",
    )
    rubric_template: TemplateRef = Field(
        TemplateRef(path="pkg://bezoar_jobs/templates/judge_rubric.txt"),
        description="generate method: the prompt that asks for a JSON verdict (status, rating, reason): "
        "{instruction} {response}",
    )
    rating_template: TemplateRef = Field(
        TemplateRef(path="pkg://bezoar_jobs/templates/judge_rating.txt"),
        description="logprobs method: the prompt that asks for a bare 1-10 rating",
    )
    threshold: Annotated[Float, Field(ge=1, le=10)] = Field(
        7.0, description="keep status pass with rating >= threshold"
    )
    require_pass: Bool = Field(True, description="also require the judge's status to be 'pass' (generate method)")
    max_attempts: PosInt = Field(3, description="asks per row when the verdict cannot be parsed")
    retry_temperature: Annotated[Float, Field(gt=0.0, le=2.0)] = Field(
        0.7, description="temperature of a re-ask when decoding.temperature is 0 (greedy would repeat the same "
        "unparseable verdict); at most 1 for an anthropic judge, as every temperature sent to the Messages API"
    )
    decoding: Decoding = Field(
        Decoding(max_new_tokens=256, temperature=0.0),
        description="the judge's verdicts (generate method; logprobs generates nothing); also generate-evol's "
        "rule 1 check, cut to 8 new tokens",
    )
    allow_empty: Bool = Field(
        False, description="commit a filtered dataset with no row kept (by default that is an error: exit 2)"
    )


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------
class Recipe(Strict):
    schema_version: Literal[1] = Field(description="the recipe format's version; this version of bezoar-jobs reads 1")
    name: str = Field(
        description="labels the run's outputs (dataset and model cards, manifests, hub uploads, the report's title); "
        "not hashed"
    )
    description: str = Field("", description="free text about the recipe; no stage reads it and it is not hashed")
    seed: Seed = Field(
        42,
        description="seed of every random choice: seed sampling, request seeds, filter re-asks, training, MT-Bench",
    )
    teacher: Endpoint = Field(description="the model that writes the instructions and responses (generate stages)")
    judge: Endpoint = Field(
        description="the model that rates responses (filter stages), checks generate-evol's evolutions (rule 1) "
        "and grades MT-Bench unless evaluation.mtbench.judge is given"
    )
    student: StudentModel = Field(
        description="the base model: the first SFT stage trains it; evaluated as the 'base' checkpoint"
    )
    seeds: SeedsConfig = Field(SeedsConfig(), description="the seed datasets of the generation schemes")
    generation: GenerationConfig = Field(GenerationConfig(), description="the generate stages, one section per scheme")
    filter: FilterConfig = Field(FilterConfig(), description="the filter stages: the judge's verdict on each row")
    training: TrainingConfig = Field(TrainingConfig(), description="the SFT stages, sft-hh and dpo")
    evaluation: EvaluationConfig = Field(
        EvaluationConfig(), description="eval-harness and eval-mtbench: which models, which benchmarks"
    )
    report: ReportConfig = Field(ReportConfig(), description="the run report (the report stage)")

    @model_validator(mode="after")
    def _cross(self) -> Recipe:
        if self.filter.method == "logprobs" and self.judge.backend != "local":
            raise ValueError("filter.method 'logprobs' needs judge.backend 'local' (remote APIs give no token scores)")
        self._within_api_ranges()
        resolved = self.evaluated_checkpoints()
        if len(set(resolved)) != len(resolved):
            raise ValueError(
                f"evaluation.checkpoints: {list(self.evaluation.checkpoints)} names one stage twice "
                f"('{SFT_ALIAS}' is {resolve_checkpoint(SFT_ALIAS, self)} with this training.sft_order)"
            )
        return self

    def _within_api_ranges(self) -> None:
        """A temperature an endpoint's API refuses fails the load naming its field, not a paid stage midway."""
        fields: dict[str, list[str]] = {"teacher": [f"generation.{p}_decoding.temperature" for p in (
            "lamini.topic", "lamini.instruction", "lamini.response", "evol.evolve", "evol.response", "orca.response")],
            "judge": ["filter.decoding.temperature"]}
        if self.filter.decoding.temperature == 0:  # greedy verdicts are re-asked at retry_temperature
            fields["judge"].append("filter.retry_temperature")
        mt_judge = "judge" if self.evaluation.mtbench.judge is None else "evaluation.mtbench.judge"
        fields.setdefault(mt_judge, []).append("evaluation.mtbench.judge_decoding.temperature")
        check_anthropic_temperatures(self, fields)

    # -- pinning: a paid run on unpinned hub revisions cannot be reproduced --------------------
    def unpinned(self) -> list[str]:
        """``field (reference)`` for each hub model or dataset the recipe names without a revision."""
        out: list[str] = []

        def model(field: str, ref: str, revision: str | None) -> None:
            if revision is None and is_hub_model(ref):
                out.append(f"{field}.revision ({ref})")

        def data(field: str, src: DatasetSource | None) -> None:
            if src is not None and src.revision is None and src.on_hub:
                out.append(f"{field}.revision ({src.path})")
            for i, f in enumerate(src.data_files if src is not None else ()):
                # a file fetched by URL is pinned only by a commit in it (a raw GitHub URL at a sha, a hub
                # file at @sha or resolve/<sha>); a branch name moves
                if re.match(r"^(https?|hf)://", f) and not re.search(r"[/@][0-9a-f]{40}(/|$)", f):
                    out.append(f"{field}.data_files.{i} ({f}: no commit in the URL)")

        for role in ("teacher", "judge"):
            e: Endpoint = getattr(self, role)
            if e.backend in ("tgi", "local", "openai-completions"):  # weights we serve: the hub copy is pinned
                model(role, e.model, e.revision)
        mt_judge = self.evaluation.mtbench.judge
        if mt_judge is not None and mt_judge.backend in ("tgi", "local", "openai-completions"):
            model("evaluation.mtbench.judge", mt_judge.model, mt_judge.revision)
        model("student", self.student.model, self.student.revision)
        data("seeds.dolly", self.seeds.dolly)
        data("seeds.flan", self.seeds.flan)
        data("generation.lamini.topics", self.generation.lamini.topics)
        data("generation.orca.system_messages", self.generation.orca.system_messages)
        data("training.hh.data", self.training.hh.data)
        data("training.dpo.data", self.training.dpo.data)
        data("evaluation.mtbench.questions", self.evaluation.mtbench.questions)
        data("evaluation.mtbench.reference_answers", self.evaluation.mtbench.reference_answers)
        data("evaluation.mtbench.reference_questions", self.evaluation.mtbench.reference_questions)
        for i, b in enumerate(self.evaluation.baselines):
            model(f"evaluation.baselines.{i}", b.model, b.revision)
        return out

    @property
    def paid(self) -> bool:
        """Whether the recipe prices anything (API tokens, GPU-hours): a run that costs money."""
        endpoints = [self.teacher, self.judge, self.evaluation.mtbench.judge]
        return any(e is not None and (e.priced or e.gpu_hour_usd is not None) for e in endpoints) or (
            self.report.gpu_hour_usd is not None
        )

    def check_pinned(self, source: str, allow: bool) -> None:
        """A run that costs money (the recipe prices API tokens or GPU-hours) must name the exact hub
        revisions it loads, or the user says --allow-unpinned; the error lists every field to pin."""
        missing = self.unpinned()
        if not missing or not self.paid:
            return
        if allow:
            logging.getLogger("bezoar").warning("%s: unpinned hub revisions (--allow-unpinned): %s", source,
                                                "; ".join(missing))
            return
        raise BadInput(
            f"{source}: this recipe prices its run but loads hub revisions that are not pinned, so the run could "
            f"not be reproduced: {'; '.join(missing)}. Pin each to a commit sha, or pass --allow-unpinned"
        )

    def evaluated_checkpoints(self) -> tuple[str, ...]:
        """evaluation.checkpoints as stage names ('sft' is the last scheme SFT stage, OpenBezoar-SFT)."""
        return tuple(resolve_checkpoint(c, self) for c in self.evaluation.checkpoints)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    # -- hashing: a stage's key is the hash of exactly the recipe fields it reads -------------
    def section_hash(self, *dotted: str) -> str:
        parts = {}
        for d in dotted:
            obj: Any = self
            for key in d.split("."):
                obj = getattr(obj, key)
            # a tuple of models (evaluation.baselines) needs pydantic to become JSON; plain values are unchanged
            parts[d] = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else to_jsonable_python(obj)
        blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading with good errors
# ---------------------------------------------------------------------------------------------
def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    data = parse_yaml(text, source, "recipe")
    if not isinstance(data, dict):
        raise BadInput(f"{source}: a recipe must be a YAML mapping at the top level")
    if "schema_version" not in data:
        raise BadInput(f"{source}: schema_version: missing (this version of bezoar-jobs reads {SCHEMA_VERSION})")
    version = data["schema_version"]
    if type(version) is not int or version != SCHEMA_VERSION:  # true and 1.0 equal 1 in Python: not here
        shown = json.dumps(version) if isinstance(version, bool | float) else repr(version)
        raise BadInput(
            f"{source}:{key_lines(text).get(('schema_version',), '?')}: schema_version: "
            f"{shown} is not supported (this version reads {SCHEMA_VERSION})"
        )
    recipe = validate(Recipe, data, text, source, "recipe")
    # the pass-through sections too, now: not when the training stage finally builds them
    check_recipe(recipe, key_lines(text), source)
    return recipe


def load_recipe(uri: str | Path) -> tuple[Recipe, str]:
    """Load a recipe from a path or a run-store URI; return the object and its exact text."""
    uri = str(uri)
    if uri.startswith("s3://"):
        from .store import open_store

        base, _, name = uri.rpartition("/")
        raw = open_store(base).read_bytes(name)
    else:
        p = Path(uri.removeprefix("file://"))
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise BadInput(f"{uri}: recipe file not found") from None
        except IsADirectoryError:
            raise BadInput(f"{uri}: is a directory, not a recipe file") from None
        except OSError as e:
            raise BadInput(f"{uri}: the recipe cannot be read: {e.strerror}") from None
    return parse_recipe(decode_text(raw, uri, "recipe"), uri), decode_text(raw, uri, "recipe")


def decode_text(raw: bytes, source: str, what: str) -> str:
    """UTF-8 text, or a BadInput naming the file, the line and the byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise BadInput(f"{source}:{line}: the {what} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                       f"{e.start}); save it as UTF-8") from None
