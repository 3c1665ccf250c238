"""The typed ``evaluation:`` and ``report:`` sections of the recipe.

Imported by :mod:`bezoar_jobs.recipe`, which the controller and the CLI load, so this module must
stay importable without torch, transformers or lm_eval (pydantic and the recipe's small types only).

Which models are evaluated (``evaluation.checkpoints`` and ``evaluation.baselines``) is shared by
both evaluation stages, so a table in the report compares the same rows for both benchmarks.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from .recipe_base import Bool, DatasetSource, Decoding, Endpoint, Float, NonNegInt, PosInt, Seed, Strict
from .registry import DEFAULT_CHECKPOINTS, SFT_ALIAS, TRAINED_STAGES

# checkpoint names a recipe may list: the base (student) model and every training stage's output
BASE = "base"

# MT-Bench's eight categories and the answer temperatures FastChat uses for them (``temperature_config`` in
# fastchat/llm_judge/common.py; docs/recipe.md, "MT-Bench answers")
MTBENCH_TEMPERATURES: dict[str, float] = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=80)]


# FastChat's judge settings for an OpenAI judge (GPT-4): greedy, room for a long explanation before the
# verdict; FastChat gives an Anthropic judge (the paper's Claude 2.1) 1,024 tokens (fastchat/llm_judge/common.py,
# run_judge_single): a verdict only a longer budget reaches counts here where FastChat would have dropped it
JUDGE_DECODING = Decoding(max_new_tokens=2048, temperature=0.0)
MTBENCH_QUESTIONS = DatasetSource(path="HuggingFaceH4/mt_bench_prompts", split="train", licence="Apache-2.0")


class Baseline(Strict):
    """An outside model evaluated beside the run's checkpoints (e.g. the released SurgeGlobal ones)."""

    name: Name = Field(description="row label in results and the report")
    model: str = Field(description="hub id, local/s3 checkpoint directory, or pkg://package/file.gguf")
    revision: str | None = Field(None, description="pinned hub revision (commit sha)")
    trust_remote_code: Bool = Field(
        False, description="run code shipped with the model repo (transformers trust_remote_code) when loading it"
    )
    counterpart: Literal["sft", "sft-hh", "dpo"] | None = Field(
        None, description="the checkpoint this model is the released counterpart of (the report sets them side by "
        "side); null: known from its hub id for the SurgeGlobal OpenBezoar models",
    )


class HarnessTask(Strict):
    """One LM Evaluation Harness task (or group, e.g. ``mmlu``) with its shots and pinned version."""

    name: str = Field(description="task or group name as lm_eval knows it (or from include_path)")
    num_fewshot: NonNegInt = Field(0, description="few-shot examples in each prompt")
    metric: str = Field("acc", description="primary metric for the summary: 'acc_norm', or 'metric,filter'")
    version: str | Float | None = Field(
        None, description="pinned task version (metadata.version); a different installed version is an error"
    )

    @property
    def metric_key(self) -> str:
        """The key lm_eval uses in its results: ``metric,filter`` (filter ``none`` when not given)."""
        return self.metric if "," in self.metric else f"{self.metric},none"


# Open LLM Leaderboard v1: tasks, shots and metrics (OpenBezoar's own task list is unknown: docs/recipe.md,
# "harness tasks"), versions as in lm_eval 0.4.13
LEADERBOARD_V1: tuple[HarnessTask, ...] = (
    HarnessTask(name="arc_challenge", num_fewshot=25, metric="acc_norm", version="1.0"),
    HarnessTask(name="hellaswag", num_fewshot=10, metric="acc_norm", version="1.0"),
    HarnessTask(name="mmlu", num_fewshot=5, metric="acc", version="2"),
    HarnessTask(name="truthfulqa_mc2", num_fewshot=0, metric="acc", version="3.0"),
    HarnessTask(name="winogrande", num_fewshot=5, metric="acc", version="1.0"),
    HarnessTask(name="gsm8k", num_fewshot=5, metric="exact_match,strict-match", version="3.0"),
)


class HarnessConfig(Strict):
    enabled: Bool = Field(True, description="false: eval-harness evaluates nothing and commits a skipped summary")
    tasks: tuple[HarnessTask, ...] = Field(LEADERBOARD_V1, description="tasks, shots and pinned versions")
    include_path: str | None = Field(
        None,
        description="directory of extra task YAMLs (a path, pkg://bezoar_jobs/... or s3://); "
        "'${task_dir}' in a YAML stands for that YAML's directory",
    )
    batch_size: PosInt | Literal["auto"] = Field(
        8, description="lm_eval's batch size; auto: lm_eval finds the largest that fits"
    )
    max_length: PosInt | None = Field(None, description="context length; null: the model's own")
    limit: PosInt | None = Field(None, description="items per task (smoke runs only: scores are not comparable)")
    bootstrap_iters: NonNegInt = Field(
        100_000, description="bootstrap resamples for stderrs of non-mean metrics (lm_eval's default); 0: no "
        "stderr at all (lm_eval then records every stderr as N/A)"
    )
    add_bos_token: Bool | None = Field(None, description="null: the harness's default for the tokenizer")
    seed: tuple[Seed | None, Seed | None, Seed | None, Seed | None] | None = Field(
        None,
        description="lm_eval's four seeds (python random, numpy, torch, few-shot sampler), as its --seed takes "
        "them (one integer sets all four); null: lm_eval's own defaults 0,1234,1234,1234, with which the Open "
        "LLM Leaderboard's numbers were made (the few-shot seed decides which examples each prompt shows)",
    )

    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers in the stage's process(es), data-parallel over data_parallel_size "
        "processes; vllm: lm_eval's vLLM backend (CUDA and the vllm package in the eval image), which evaluates "
        "data- and tensor-parallel")
    data_parallel_size: PosInt = Field(
        1, description="hf: processes the stage runs on (torch.distributed.run; one GPU each on CUDA, gloo "
        "processes on CPU), the model's requests split between them; vllm: model replicas over the pod's GPUs "
        "(needs ray)")
    tensor_parallel_size: PosInt = Field(1, description="vllm: GPUs each replica is split over")
    gpu_memory_utilization: Annotated[Float, Field(gt=0, le=1)] = Field(
        0.9, description="vllm: the fraction of each GPU's memory vLLM may take")

    @model_validator(mode="after")
    def _parallel(self) -> HarnessConfig:
        if self.backend == "hf" and self.tensor_parallel_size > 1:
            raise ValueError("tensor_parallel_size needs backend: vllm (the hf backend holds one whole copy of the "
                             "model per process; use data_parallel_size)")
        return self

    @property
    def gpus(self) -> int:
        """GPUs the evaluation uses at once on CUDA (the eval pod must have them): hf, one per process."""
        return self.data_parallel_size * self.tensor_parallel_size

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, v: object) -> object:
        return (v, v, v, v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: tuple[HarnessTask, ...]) -> tuple[HarnessTask, ...]:
        names = [t.name for t in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task(s) listed twice: {', '.join(dup)}")
        return v


class MTBenchConfig(Strict):
    enabled: Bool = Field(True, description="false: eval-mtbench evaluates nothing and commits a skipped summary")
    questions: DatasetSource = Field(
        MTBENCH_QUESTIONS,
        description="a dataset source (as the recipe's seeds) in MT-Bench's question.jsonl format "
        "(question_id, category, turns[2], reference) or the hub copy's columns (prompt_id, prompt, reference)",
    )
    reference_answers: DatasetSource | None = Field(
        None,
        description="FastChat answer-file format (question_id, choices[0].turns): the references of the "
        "categories below, replacing the questions' own; every reference category question must get one",
    )
    reference_questions: DatasetSource | None = Field(
        None,
        description="the question file the reference answers' ids belong to (FastChat's question.jsonl): "
        "references are then matched to the questions by their first turn's text (the hub copy's ids are "
        "hashes, FastChat's are 81-160)",
    )
    reference_id_map: dict[str, str] = Field(
        default_factory=dict, description="reference answer question_id -> this recipe's question id"
    )
    reference_categories: tuple[str, ...] = Field(
        ("math", "reasoning", "coding"),
        description="categories whose questions need a reference answer for each turn; the judge is shown it",
    )
    categories: tuple[str, ...] | None = Field(None, description="evaluate only these categories")
    # answering
    temperatures: dict[str, Annotated[Float, Field(ge=0.0, le=2.0)]] = Field(
        default_factory=lambda: dict(MTBENCH_TEMPERATURES),
        description="answer temperature per category, laid over FastChat's (a recipe that names one category "
        "keeps the others' FastChat temperatures)",
    )
    default_temperature: Annotated[Float, Field(ge=0.0, le=2.0)] = Field(
        0.7, description="answer temperature of a category not in temperatures"
    )
    answer_max_new_tokens: PosInt = Field(1024, description="FastChat's default")
    answer_batch_size: PosInt = Field(8, description="questions answered together in one generate batch")
    answer_system: str | None = Field(None, description="system text of the prompt format; null: its default")
    # judging
    judge: Endpoint | None = Field(None, description="an endpoint (as the recipe's judge); null: the recipe's judge")
    judge_method: Literal["generate", "logprobs"] = Field(
        "generate", description="generate: parse the judge's [[rating]]; logprobs: expected rating from "
        "the rating-token probabilities (in-process judge only)"
    )
    judge_prompts: str = Field(
        "pkg://bezoar_jobs/templates/mtbench_judge.txt",
        description="our sectioned template file, or a FastChat judge_prompts.jsonl",
    )
    judge_decoding: Decoding = Field(JUDGE_DECODING, description="decoding (as elsewhere)")
    logprobs_prefix: str = Field("Rating: [[", description="text after which the rating token is scored")

    @field_validator("temperatures", mode="before")
    @classmethod
    def _over_fastchats(cls, v: Any) -> Any:
        # laid over FastChat's table: `{writing: 0.5}` alone moved math, coding and reasoning from greedy to
        # default_temperature (0.7) without a word
        return {**MTBENCH_TEMPERATURES, **v} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _check(self) -> MTBenchConfig:
        if (self.reference_questions is not None or self.reference_id_map) and self.reference_answers is None:
            raise ValueError("reference_questions / reference_id_map need reference_answers")
        if self.reference_questions is not None and self.reference_id_map:
            raise ValueError("match references by text (reference_questions) or by reference_id_map, not both")
        if self.judge is not None and self.judge_method == "logprobs" and self.judge.backend != "local":
            raise ValueError("judge_method 'logprobs' needs judge.backend 'local' (remote APIs give no token scores)")
        return self


class EvaluationConfig(Strict):
    checkpoints: tuple[str, ...] = Field(
        (BASE, *DEFAULT_CHECKPOINTS),
        description=f"'{BASE}' (the student) and/or training stages whose committed model/ is evaluated; "
        f"'{SFT_ALIAS}' is OpenBezoar-SFT: the last scheme SFT stage of training.sft_order",
    )
    baselines: tuple[Baseline, ...] = Field((), description="outside models evaluated beside the checkpoints")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weight dtype of the evaluated models (MT-Bench and the harness, either backend; float16 on "
        "GPUs without bfloat16 such as V100 and T4); auto: bfloat16 on a GPU that supports it, else float32 (the "
        "harness's vllm backend: vLLM's own choice from the checkpoint's config)",
    )
    device: str = Field(
        "auto",
        description="torch device of the evaluated models (cpu, cuda, cuda:1); auto: cuda if available; the hf "
        "harness on several processes takes one GPU each",
    )
    harness: HarnessConfig = Field(HarnessConfig(), description="eval-harness: LM Evaluation Harness tasks")
    mtbench: MTBenchConfig = Field(
        default_factory=lambda: MTBenchConfig(), description="eval-mtbench: MT-Bench answers and judgments"
    )

    @field_validator("checkpoints")
    @classmethod
    def _checkpoints(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        allowed = (BASE, SFT_ALIAS, *TRAINED_STAGES)
        bad = [c for c in v if c not in allowed]
        if bad:
            raise ValueError(f"unknown checkpoint(s) {bad}; choose from {', '.join(allowed)}")
        if len(set(v)) != len(v):
            raise ValueError("a checkpoint is listed twice")
        return v

    @model_validator(mode="after")
    def _names(self) -> EvaluationConfig:
        names = [b.name for b in self.baselines]
        clash = sorted({n for n in names if names.count(n) > 1 or n in (BASE, SFT_ALIAS, *TRAINED_STAGES)})
        if clash:
            raise ValueError(f"baseline name(s) {clash} repeat or clash with checkpoint names")
        if not self.checkpoints and not self.baselines:
            raise ValueError("nothing to evaluate: give checkpoints or baselines")
        return self

    def model_names(self) -> list[str]:
        """Every evaluated model's label, in report order: checkpoints, then baselines."""
        return [*self.checkpoints, *(b.name for b in self.baselines)]


class ReportConfig(Strict):
    title: str | None = Field(None, description="page title; null: the recipe's name")
    gpu_hour_usd: Annotated[Float, Field(ge=0)] | None = Field(None, description="price of one GPU-hour, for costs")
    judgments_shown: NonNegInt = Field(3, description="MT-Bench judgments quoted per model in the report")
    include_recipe: Bool = Field(
        True, description="end the report with the run's recipe text (credentials in URLs masked)"
    )
