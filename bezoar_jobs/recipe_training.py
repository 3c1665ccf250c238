"""The typed ``training:`` section of the recipe (SFT stages, HH-RLHF SFT, DPO).

This module is imported by :mod:`bezoar_jobs.recipe`, which the controller and the CLI load, so it
must stay importable without torch, transformers, trl or peft. TRL/PEFT settings therefore travel
as plain dicts of scalars here (``sft_args``, ``dpo.dpo_args``, ``lora``); their keys are checked
against the real config classes (``SFTConfig``, ``DPOConfig``, ``LoraConfig``) when a stage builds
its configuration (:func:`bezoar_jobs.training.config.build_sft_config` and friends), so a typo
fails with the dotted recipe path before any model is loaded.

Pass-through dicts are *overrides*: the keys a recipe gives are laid over the defaults below (the
QLoRA reference script's settings wherever the paper is silent: docs/recipe.md, "SFT settings"), and
a key set to ``null`` removes our default so the TRL/PEFT class default applies. The merged dict is
what the stage's parameter hash covers.
"""

from __future__ import annotations

import datetime
import math
import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidatorFunctionWrapHandler, WrapValidator, field_validator
from pydantic_core import PydanticCustomError

from .recipe_base import Bool, DatasetSource, Float, PosInt, Strict
from .registry import DEFAULT_SFT_ORDER, SCHEME_NAMES, SFT_STAGES
from .yamlmodel import finite_problem

SCHEMES: tuple[str, ...] = SCHEME_NAMES

Scalar = str | int | float | bool | None
_SCALAR_WORDS = "a number, text, true/false or null"  # what a pass-through value (or its items) may be


def _pass_problem(v: Any, at: tuple[Any, ...] = (), nested: bool = True) -> tuple[tuple[Any, ...], str] | None:
    """(where under the key, what is wrong) of a pass-through value, or None: a scalar, or (``nested``)
    a list of scalars or a mapping of text keys to scalars; a float is finite."""
    if v is None or isinstance(v, str | int | bool):
        return None
    if isinstance(v, float):
        return None if math.isfinite(v) else (at, finite_problem(v))
    if nested and isinstance(v, list):
        return next((p for i, x in enumerate(v) if (p := _pass_problem(x, (*at, i), False))), None)
    if nested and isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                return (*at, k), f"key {k!r} should be text"
            if p := _pass_problem(x, (*at, k), False):
                return p
        return None
    if isinstance(v, dict | list):
        got = "a mapping" if isinstance(v, dict) else "a list"
    elif isinstance(v, datetime.date):
        got = "a date (quote it to pass it as text)"
    else:
        got = f"a value of type {type(v).__name__}"
    want = "a number, text, true/false, null, a list or a mapping" if nested else _SCALAR_WORDS
    return at, f"expected {want}, got {got}"


def _check_pass_value(v: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """One clear error per bad value (pydantic's union would list each member's), at the key inside."""
    if found := _pass_problem(v):
        at, problem = found
        raise PydanticCustomError("pass_value", "{problem}", {"problem": problem, "at": at})
    return handler(v)


PassValue = Annotated[Scalar | list[Scalar] | dict[str, Scalar], WrapValidator(_check_pass_value)]
PassArgs = dict[str, PassValue]

# SFTConfig overrides shared by every SFT stage (the QLoRA reference script's values, docs/recipe.md
# "SFT settings"; the optimizer is adamw_torch here, the script's paged_adamw_32bit in recipes/openbezoar.yaml;
# epochs are unknown for OpenBezoar: 1 here, recipes say what they use).
SFT_DEFAULTS: dict[str, PassValue] = {
    "learning_rate": 2e-4,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 0.03,  # a float below 1 is a ratio of the total steps
    "max_grad_norm": 0.3,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 4,
    "num_train_epochs": 1,
    "max_length": 2048,
    "optim": "adamw_torch",
    "weight_decay": 0.0,
    # batches are padding-free either way (training.batching says what a batch counts)
    "activation_checkpointing": False,  # transformers 5 name of gradient checkpointing
}

# DPOConfig overrides (OpenBezoar gives none of these but the epoch: beta 0.1 is TRL's and the DPO paper's
# default, max_length 1024 our choice, lr from the alignment-handbook QLoRA DPO recipe; docs/recipe.md
# "DPO settings").
DPO_DEFAULTS: dict[str, PassValue] = {
    "beta": 0.1,
    "max_length": 1024,
    "learning_rate": 5e-6,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.1,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 4,
    "num_train_epochs": 1,
    "optim": "adamw_torch",
    "activation_checkpointing": False,  # transformers 5 name of gradient checkpointing
}

# LoraConfig overrides (the OpenBezoar model card: r 16, alpha 16, dropout 0.05 on q, k, v).
LORA_DEFAULTS: dict[str, PassValue] = {
    "r": 16,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj"],
    "bias": "none",
}


# TrainingArguments fields transformers 5 renamed: the old name is an alias that TrainingArguments.__post_init__
# reads only while the new one is unset, so under our default of the new name (activation_checkpointing: false)
# a recipe's `gradient_checkpointing: true` would be dropped without a word. The old name is read as the new one.
RENAMED_TRAINER_ARGS: dict[str, str] = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def rename_trainer_args(given: Any) -> Any:
    """``given`` with the old names of :data:`RENAMED_TRAINER_ARGS` written as the new ones (anything but a
    mapping is returned as it is, for the caller's own error)."""
    if not isinstance(given, dict):
        return given
    out: dict[Any, Any] = {}
    for k, v in given.items():
        new = RENAMED_TRAINER_ARGS.get(k, k) if isinstance(k, str) else k
        if new != k and new in given and given[new] != v:
            raise ValueError(f"{k} and {new} are one setting ({k} is its old name) and are given different values: "
                             f"give {new} only")
        out[new] = v
    return out


def merge_overrides(defaults: dict[str, PassValue], given: Any, trainer_args: bool = False) -> dict[str, PassValue]:
    """``defaults`` with ``given`` laid over it; a ``None`` value drops the key (TRL/PEFT default).
    ``trainer_args``: SFTConfig/DPOConfig settings, whose renamed fields are read under their new names."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ValueError("must be a mapping of config-class field names to values")
    if trainer_args:
        given = rename_trainer_args(given)
    out = dict(defaults)
    for k, v in given.items():
        if not isinstance(k, str):
            raise ValueError(f"key {k!r} is not a string")
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


class HHConfig(Strict):
    """``sft-hh``: SFT on the chosen dialogues of Anthropic/hh-rlhf (first ``data.limit`` rows)."""

    data: DatasetSource = Field(
        DatasetSource(path="Anthropic/hh-rlhf", limit=100_000, licence="MIT"),
        description="HH-RLHF rows (chosen and rejected dialogues): sft-hh trains on each chosen dialogue's final "
        "assistant turn; dpo's pairs unless training.dpo.data",
    )


class DPOStageConfig(Strict):
    """``dpo``: DPO with a LoRA adapter; the reference model is the adapter-disabled policy."""

    data: DatasetSource | None = Field(None, description="preference pairs; null: the same rows as training.hh.data")
    dpo_args: PassArgs = Field(default_factory=lambda: dict(DPO_DEFAULTS), description="DPOConfig overrides")
    lora: PassArgs | None = Field(
        None, description="LoraConfig overrides for DPO, laid over the built-in defaults as training.lora is (not "
        "over training.lora: give every setting DPO should share with it); null: training.lora as it is"
    )

    @field_validator("dpo_args", mode="before")
    @classmethod
    def _dpo_args(cls, v: Any) -> dict[str, PassValue]:
        return merge_overrides(DPO_DEFAULTS, v, trainer_args=True)

    @field_validator("lora", mode="before")
    @classmethod
    def _lora(cls, v: Any) -> dict[str, PassValue] | None:
        return None if v is None else merge_overrides(LORA_DEFAULTS, v)


class PushConfig(Strict):
    """Optional upload of each training stage's checkpoint (and its training data) to a model hub.
    Off unless the recipe has this section; the token comes from the environment, never the recipe."""

    repo_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")] = Field(
        description="owner/name-prefix: stage S goes to owner/name-prefix-S"
    )
    private: Bool = Field(True, description="create the hub repos as private")
    token_env: str = Field(
        "HF_TOKEN", description="environment variable holding the hub token; the stage fails when it is unset"
    )
    datasets: Bool = Field(True, description="also push the stage's training rows as a dataset repo")


class TrainingConfig(Strict):
    sft_order: tuple[str, ...] = Field(
        DEFAULT_SFT_ORDER,
        description="order of the scheme SFT stages; each starts from the previous one's model (default lamini, "
        "orca, evol: the model card's order and the authors' intermediate checkpoint's name, docs/recipe.md)",
    )
    quantization: Literal["auto", "4bit", "none"] = Field(
        "auto", description="auto: 4-bit NF4 QLoRA on CUDA, plain LoRA on CPU; 4bit / none force one"
    )
    bnb_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="4-bit compute dtype; auto: bfloat16 on CUDA, float32 on CPU"
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="training precision; auto: bf16 on CUDA when supported, else fp16; fp32 on CPU"
    )
    merge_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the merged full checkpoint written to model/"
    )
    checkpoint_every: PosInt = Field(50, description="optimizer steps between checkpoints")
    keep_checkpoints: PosInt = Field(2, description="complete checkpoints kept in _work/")
    long_prompts: Literal["error", "drop"] = Field(
        "error",
        description="a row whose prompt alone fills max_length: error (exit 2, naming the row) or drop it "
        "(counted in the manifest); a response that does not fit is cut at max_length either way",
    )
    max_dropped_fraction: Annotated[Float, Field(ge=0.0, le=1.0)] = Field(
        0.2, description="fail (exit 2) when more than this fraction of rows is dropped"
    )
    batching: Literal["examples", "packed"] = Field(
        "examples",
        description="what per_device_train_batch_size counts. examples (default, as the QLoRA reference): each "
        "batch holds exactly that many examples, flattened without padding (the stage's per-example attention "
        "keeps them apart); packed: that many rows of max_length tokens, each packed with as many whole examples "
        "as fit (TRL's packing, strategy sft_args.packing_strategy, default bfd): tokens per step, far more "
        "examples and fewer optimizer steps per epoch than the same numbers with examples",
    )
    attention: str = Field(
        "auto",
        description="attention implementation while training: auto: per-example SDPA (bezoar_segments) for "
        "padding-free batches, the model's default otherwise; or a transformers name (sdpa, eager, "
        "flash_attention_2, ...)",
    )
    shared_prefix: Bool = Field(
        True,
        description="with per-example attention (bezoar_segments): compute a prompt prefix that several "
        "examples of a batch share (the system text) once per batch; same losses and gradients",
    )
    response_head: Bool = Field(
        True,
        description="on CPU, project only the scored (response) positions through the LM head: our SFT loss, "
        "and TRL's compact fused head for DPO (TRL scores every position without Triton); false: TRL as is",
    )
    lora: PassArgs = Field(default_factory=lambda: dict(LORA_DEFAULTS), description="LoraConfig overrides")
    sft_args: PassArgs = Field(default_factory=lambda: dict(SFT_DEFAULTS), description="SFTConfig overrides")
    stage_args: dict[str, PassArgs] = Field(
        default_factory=dict,
        description="per-stage SFTConfig overrides laid over sft_args (null drops the key for that stage)",
    )
    hh: HHConfig = Field(HHConfig(), description="sft-hh: SFT on HH-RLHF, from the last scheme SFT stage's model")
    dpo: DPOStageConfig = Field(DPOStageConfig(), description="dpo: DPO with a LoRA adapter, from sft-hh's model")
    base_licence: str | None = Field(None, description="licence for model cards; null: read from the base model's card")
    report_to: tuple[Literal["tensorboard", "wandb", "mlflow"], ...] = Field(
        (), description="experiment trackers (the `tracking` extra); losses always go to the stage's metrics.jsonl"
    )
    push: PushConfig | None = Field(
        None, description="upload each training stage's merged checkpoint to the model hub; null: no upload"
    )

    @field_validator("sft_order")
    @classmethod
    def _order(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if sorted(v) != sorted(SCHEMES):
            raise ValueError(f"must list each of {', '.join(SCHEMES)} exactly once")
        return v

    @field_validator("stage_args")
    @classmethod
    def _stage_args(cls, v: dict[str, PassArgs]) -> dict[str, PassArgs]:
        bad = sorted(k for k in v if k not in SFT_STAGES)
        if bad:
            raise ValueError(f"unknown SFT stage(s) {', '.join(bad)}; choose from {', '.join(SFT_STAGES)}")
        return {stage: rename_trainer_args(args) for stage, args in v.items()}

    @field_validator("attention")
    @classmethod
    def _attention(cls, v: str) -> str:
        known = ("auto", "bezoar_segments", "sdpa", "eager", "flex_attention")
        if v in known or re.fullmatch(r"flash_attention_[234]|[\w.-]+/[\w.-]+(:[\w.-]+)?", v):
            return v
        raise ValueError(
            f"unknown attention implementation {v!r}: use one of {', '.join(known)}, flash_attention_2/3/4 "
            "or a hub kernel (org/repo)"
        )

    @field_validator("sft_args", mode="before")
    @classmethod
    def _sft_args(cls, v: Any) -> dict[str, PassValue]:
        return merge_overrides(SFT_DEFAULTS, v, trainer_args=True)

    @field_validator("lora", mode="before")
    @classmethod
    def _lora(cls, v: Any) -> dict[str, PassValue]:
        return merge_overrides(LORA_DEFAULTS, v)

    # -- helpers the stages use (pure) ------------------------------------------------------
    def sft_stage_names(self) -> list[str]:
        return [f"sft-{s}" for s in self.sft_order]

    def previous_stage(self, stage: str) -> str | None:
        """The stage whose committed model ``stage`` starts from; None: the student base model."""
        order = self.sft_stage_names()
        if stage == "sft-hh":
            return order[-1]
        if stage == "dpo":
            return "sft-hh"
        i = order.index(stage)
        return order[i - 1] if i else None

    def stage_sft_args(self, stage: str) -> dict[str, PassValue]:
        """The effective SFTConfig overrides of one SFT stage: sft_args, then stage_args[stage]."""
        return merge_overrides(dict(self.sft_args), self.stage_args.get(stage))  # both renamed when they loaded

    def dpo_data(self) -> DatasetSource:
        return self.dpo.data or self.hh.data

    def dpo_lora(self) -> dict[str, PassValue]:
        return dict(self.dpo.lora) if self.dpo.lora is not None else dict(self.lora)
