"""The recipe's shared building blocks: the strict base model, bounded number types, decoding
settings, teacher/judge endpoints and dataset sources.

They live apart from recipe.py so that the recipe's sections in their own modules
(recipe_training.py, recipe_eval.py), which recipe.py imports, can type their fields with them
directly. Like recipe.py, this imports neither torch nor any client library.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic import Strict as StrictType
from pydantic_core import PydanticCustomError

from .recipe_view import get_path


class Strict(BaseModel):
    """The recipe's base model: unknown keys refused, frozen, and every float finite (NaN and
    infinity refused, with the value named: yamlmodel.format_errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _number_not_bool(v: object) -> object:
    """Pydantic's float takes true as 1.0: the recipe's numbers refuse true/false."""
    if isinstance(v, bool):
        raise PydanticCustomError("float_type", "Input should be a number, got {got}", {"got": str(v).lower()})
    return v


# The recipe's scalar types. Pydantic's lax mode turns true into 1, 2.0 into 2 and 1 into true: an
# int or a bool of the recipe takes exactly that (Strict), a float takes an int or a float (and,
# as YAML 1.1 reads 1e-3 as text, a number written as text) but not true/false. Every int, float
# and bool field of the recipe uses these (or Seed) (tests/test_recipe.py checks the models' schemas).
Float = Annotated[float, BeforeValidator(_number_not_bool)]
Bool = Annotated[bool, StrictType()]
PosInt = Annotated[int, StrictType(), Field(gt=0)]
NonNegInt = Annotated[int, StrictType(), Field(ge=0)]
Prob = Annotated[float, BeforeValidator(_number_not_bool), Field(ge=0.0, le=1.0)]
# a random seed: what numpy, torch and transformers.set_seed take
Seed = Annotated[int, StrictType(), Field(ge=0, le=2**32 - 1)]


# ---------------------------------------------------------------------------------------------
# Models and endpoints
# ---------------------------------------------------------------------------------------------
class Decoding(Strict):
    max_new_tokens: PosInt = Field(256, description="most tokens generated per answer")
    temperature: Annotated[Float, Field(ge=0.0, le=5.0)] = Field(0.7, description="sampling temperature; 0: greedy")
    top_p: Annotated[Float, Field(gt=0.0, le=1.0)] = Field(
        1.0, description="nucleus sampling: sample among the most likely tokens holding this much probability; 1: off"
    )
    repetition_penalty: Annotated[Float, Field(gt=0.0)] | None = Field(
        None,
        description="sent to TGI, OpenAI-compatible servers (as vLLM and SGLang read it; to TGI's chat route as "
        "presence_penalty = penalty - 2, which it reads instead) and the local backend, never to Anthropic; "
        "null: not sent",
    )
    stop: tuple[str, ...] = Field((), description="stop strings: the answer ends before the first one it contains")


# the Messages API's range for temperature is 0 to 1 (its API reference, `temperature`)
ANTHROPIC_MAX_TEMPERATURE = 1.0


def check_anthropic_temperatures(recipe: Any, fields: dict[str, list[str]]) -> None:
    """Each temperature (a dotted field of ``recipe``) sent to an endpoint (the key, its dotted field) that is
    Anthropic's Messages API must be one that API takes: a ValueError names the first that is not."""
    for role, names in fields.items():
        endpoint = get_path(recipe, role)
        if endpoint is None or endpoint.backend != "anthropic":
            continue
        for name in names:
            t = get_path(recipe, name)
            if t > ANTHROPIC_MAX_TEMPERATURE:
                raise ValueError(f"{name}: {t:g} is above {ANTHROPIC_MAX_TEMPERATURE:g}, the most the Anthropic "
                                 f"Messages API takes ({role}.backend is anthropic)")


# backends that send a raw prompt (filled from prompt_format) to a server at base_url
RAW_PROMPT_BACKENDS: tuple[str, ...] = ("tgi", "openai-completions")


class Endpoint(Strict):
    """A teacher or judge: where it runs and how to talk to it.

    backend:
      tgi                 Text Generation Inference (its generate route over HTTP), raw prompts
      openai-completions  an OpenAI-compatible /v1/completions server (vLLM, SGLang), raw prompts
      openai-chat         an OpenAI-compatible /v1/chat/completions API (GPT-4-class judges)
      anthropic           Anthropic Messages API (Claude)
      local               in-process transformers batched generation (the embedded default)
    """

    backend: Literal["tgi", "openai-completions", "openai-chat", "anthropic", "local"] = Field(
        description="how requests are sent: tgi and openai-completions send raw prompts (prompt_format) to a "
        "server; openai-chat and anthropic send system and user messages to an API; local runs the model in "
        "process (transformers)"
    )
    model: str = Field(description="hub id, local/s3 directory, or pkg://package/file.gguf (local backend)")
    revision: str | None = Field(None, description="pinned hub revision (commit sha) of the model")
    base_url: str | None = Field(
        None,
        description="server URL (OpenAI-compatible: with /v1), required for tgi and openai-completions; null: the "
        "API's default; on a cluster the chart's teacher Service replaces a tgi or openai-completions teacher's",
    )
    api_key_env: str | None = Field(None, description="name of the env var holding the API key")
    api_key_file: str | None = Field(None, description="path of a mounted file holding the API key")
    prompt_format: str | None = Field(
        None,
        description="raw-prompt backends: template with {system} and {user}; "
        "local backend: null uses the tokenizer's chat template",
    )
    system_prompt_supported: Bool = Field(
        True,
        description="chat backends (openai-chat, anthropic, local with the chat template): false puts the system "
        "text in front of the user text instead of in the system slot",
    )
    max_concurrency: PosInt = Field(
        16, description="remote backends: requests in flight at once per client; a shared teacher's budget may lower it"
    )
    requests_per_minute: Annotated[Float, Field(gt=0)] | None = Field(
        None, description="rate limit in requests per minute; null: none"
    )
    tokens_per_minute: Annotated[Float, Field(gt=0)] | None = Field(
        None,
        description="rate limit in tokens per minute (a request counts its estimated prompt plus max_new_tokens, "
        "corrected by the server's usage); null: none",
    )
    max_retries: NonNegInt = Field(
        6, description="retries of a request after a 429, 5xx, timeout, connection error or malformed answer"
    )
    timeout_s: Annotated[Float, Field(gt=0)] = Field(120.0, description="seconds one attempt may wait for its answer")
    backoff_base_s: Annotated[Float, Field(gt=0)] = Field(
        1.0, description="retry wait: uniform up to min(backoff_max_s, backoff_base_s * 2^failures) seconds"
    )
    backoff_max_s: Annotated[Float, Field(gt=0)] = Field(60.0, description="the longest retry wait, in seconds")
    price_input_per_mtok: Annotated[Float, Field(ge=0)] | None = Field(None, description="USD per 1M input tokens")
    price_output_per_mtok: Annotated[Float, Field(ge=0)] | None = Field(None, description="USD per 1M output tokens")
    spend_cap_usd: Annotated[Float, Field(gt=0)] | None = Field(
        None, description="stop paying beyond this: this role's spend in a stage across its attempts (answers an "
        "earlier attempt paid for and saved, or cached, included)"
    )
    # self-hosted servers (the TGI teacher): their cost is GPU time, not tokens
    gpus: PosInt | None = Field(None, description="GPUs serving this model, for GPU-hours (e.g. 2 for Falcon-40B)")
    gpu_hour_usd: Annotated[Float, Field(ge=0)] | None = Field(None, description="USD per GPU-hour of those GPUs")
    # the context window: a request whose prompt plus max_new_tokens exceeds it is refused by the
    # server (TGI answers HTTP 422 on every retry), so the stages measure and skip such rows
    context_tokens: PosInt | None = Field(
        None, description="the model's context window in tokens (prompt + max_new_tokens); null: not checked"
    )
    tokenizer: str | None = Field(
        None, description="tokenizer that measures prompts for context_tokens (hub id or directory); null: the model's"
    )
    # in-process (local) backend
    batch_size: PosInt = Field(8, description="local backend: prompts generated together in one batch")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="local backend: weight dtype; auto: bfloat16 on a GPU that supports it, else float32"
    )
    device: str = Field("auto", description="local backend: torch device (cpu, cuda, cuda:1); auto: cuda if available")
    trust_remote_code: Bool = Field(
        False,
        description="run code shipped with the model repo (transformers trust_remote_code): loading the local "
        "backend's model and the tokenizer that measures context_tokens",
    )

    @model_validator(mode="after")
    def _check(self) -> Endpoint:
        remote = self.backend != "local"
        if remote and not self.base_url and self.backend in RAW_PROMPT_BACKENDS:
            raise ValueError(f"backend {self.backend!r} needs base_url")
        if self.backend in RAW_PROMPT_BACKENDS and not self.prompt_format:
            raise ValueError(f"backend {self.backend!r} sends raw prompts: prompt_format is required")
        if self.prompt_format and "{user}" not in self.prompt_format:
            raise ValueError("prompt_format must contain {user}")
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        return self

    # -- money: the one place the price formula lives (stages, the client's spending cap, the plan)
    @property
    def priced(self) -> bool:
        return self.price_input_per_mtok is not None or self.price_output_per_mtok is not None

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        """USD for these tokens at the endpoint's prices (a missing price counts 0)."""
        return (prompt_tokens * (self.price_input_per_mtok or 0.0)
                + completion_tokens * (self.price_output_per_mtok or 0.0)) / 1e6

    def cost_usd(self, prompt_tokens: float, completion_tokens: float) -> float | None:
        """:meth:`cost` rounded for a manifest, or None when the recipe gives no price."""
        return round(self.cost(prompt_tokens, completion_tokens), 6) if self.priced else None

    def gpu_hours(self, seconds: float) -> float | None:
        """GPU-hours of ``seconds`` of serving on the endpoint's ``gpus`` (None: gpus not given)."""
        return round(self.gpus * seconds / 3600.0, 6) if self.gpus else None

    def gpu_cost_usd(self, seconds: float) -> float | None:
        hours = self.gpu_hours(seconds)
        return round(hours * self.gpu_hour_usd, 6) if hours is not None and self.gpu_hour_usd is not None else None


# dataset paths that name a file rather than a hub dataset (data/io.py reads these itself)
FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".jsonl.gz", ".ndjson.gz", ".json.gz")
_LOCAL_PREFIXES = ("pkg://", "s3://", "file://", "/", "./", "../", "~")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_file_path(path: str) -> bool:
    """Whether a dataset path names a file (local, file://, s3://, pkg://) rather than a hub dataset."""
    return path.startswith(_LOCAL_PREFIXES) or path.lower().endswith(FILE_SUFFIXES)


def is_hub_model(ref: str) -> bool:
    """Whether a model reference is a hub id (org/name) rather than a directory, s3:// or pkg:// file."""
    return not ref.startswith(_LOCAL_PREFIXES) and bool(_HUB_ID.match(ref))


class DatasetSource(Strict):
    """A dataset: a hub id (pinned revision) or a local / s3:// file (jsonl, json, parquet, csv),
    or pkg://bezoar_jobs/<path> for the demo files shipped inside the package."""

    path: str = Field(
        description="hub dataset id; a file (local path, file://, s3:// or pkg://) in .jsonl or .ndjson "
        "(optionally .gz), .json, .parquet or .csv; or a datasets builder (json, csv, parquet, text) with data_files"
    )
    revision: str | None = Field(None, description="hub datasets: pinned revision (commit sha)")
    name: str | None = Field(None, description="hub config / subset name")
    split: str = Field("train", description="hub datasets and builders: the split read")
    data_files: tuple[str, ...] = Field(
        (), description="hub datasets and builders: only these files (datasets.load_dataset data_files)"
    )
    limit: PosInt | None = Field(None, description="read only the first this many rows; null: all")
    licence: str = Field("unknown", description="the data's licence, for the dataset and model cards built from it")

    @property
    def on_hub(self) -> bool:
        """A hub dataset (pinned by ``revision``), not a file; packaged builders (json, csv,
        parquet with ``data_files``) read local files and have nothing to pin."""
        return not is_file_path(self.path) and self.path not in ("json", "csv", "parquet", "text")
