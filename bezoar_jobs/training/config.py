"""Build TRL / PEFT config objects from the recipe's pass-through dicts, and decide the device plan.

The recipe keeps ``training.sft_args``, ``training.stage_args``, ``training.dpo.dpo_args`` and
``training.lora`` as plain dicts (see recipe_training.py). Here each key is checked against the
fields of the real class (``dataclasses.fields(SFTConfig)`` etc.): an unknown key or a field the
stage owns is a BadInput naming the dotted recipe path, before any model is loaded. Values keep the
class's own validation (its ``__post_init__``); strings that YAML left unparsed for numeric fields
(``2e-4`` is a string to YAML 1.1) are converted.

Fields the stage owns (output and checkpoint locations, resume, hub upload, logging cadence,
precision, seed, the data format) are refused with the reason; the recipe has its own keys for the
parts a user may choose (``training.checkpoint_every``, ``training.report_to``, ``training.push``,
``training.precision``, the top-level ``seed``).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInput
from ..recipe_training import PassValue, TrainingConfig
from ..registry import SFT_STAGES

# field -> why the stage owns it (shared by SFTConfig and DPOConfig; both extend TrainingArguments)
_OWNED_COMMON: dict[str, str] = {
    "output_dir": "the stage writes checkpoints into its own work directory",
    "overwrite_output_dir": "the stage writes checkpoints into its own work directory",
    "save_strategy": "checkpoints are the stage's: set training.checkpoint_every",
    "save_steps": "checkpoints are the stage's: set training.checkpoint_every",
    "save_total_limit": "checkpoints are the stage's: set training.keep_checkpoints",
    "save_only_model": "a checkpoint must hold optimizer, scheduler and RNG state to resume",
    "save_on_each_node": "checkpoints are the stage's",
    "enable_jit_checkpoint": "checkpoints are the stage's",
    "resume_from_checkpoint": "the stage resumes from the newest complete checkpoint in the run by itself",
    "ignore_data_skip": "a resumed stage must continue at the data position it stopped at",
    "restore_callback_states_from_checkpoint": "the stage's resume logic decides",
    "push_to_hub": "use training.push",
    "logging_dir": "the stage chooses where logs go",
    "logging_strategy": "the stage logs every step to metrics.jsonl",
    "logging_steps": "the stage logs every step to metrics.jsonl",
    "logging_first_step": "the stage logs every step to metrics.jsonl",
    "report_to": "use training.report_to (metrics.jsonl is always written)",
    "run_name": "the run name is the stage name",
    "seed": "the recipe's top-level seed is used",
    "data_seed": "the recipe's top-level seed is used",
    "full_determinism": "the recipe's top-level seed is used",
    "use_cpu": "the device decides (training.quantization / training.precision)",
    "bf16": "use training.precision",
    "fp16": "use training.precision",
    "bf16_full_eval": "use training.precision",
    "fp16_full_eval": "use training.precision",
    "model_init_kwargs": "the stage loads the model (recipe student, trust_remote_code)",
    "trust_remote_code": "use student.trust_remote_code",
    "remove_unused_columns": "the stage prepares the dataset columns",
    "do_train": "the stage trains",
    "do_eval": "the training stages have no evaluation split",
    "do_predict": "the training stages have no evaluation split",
    "eval_strategy": "the training stages have no evaluation split",
    "eval_steps": "the training stages have no evaluation split",
    "load_best_model_at_end": "the training stages have no evaluation split",
    "metric_for_best_model": "the training stages have no evaluation split",
    "local_rank": "set by the launcher",
    "pad_token": "the stage sets the pad token (eos, or unk when the tokenizer has no eos)",
    "eos_token": "the end of a response is the tokenizer's eos token",
}
_OWNED_SFT: dict[str, str] = {
    "dataset_text_field": "the stage renders and tokenizes the OpenBezoar prompt format itself",
    "dataset_kwargs": "the stage renders and tokenizes the OpenBezoar prompt format itself",
    "completion_only_loss": "the loss is on response tokens only, always (the stage builds the labels)",
    "assistant_only_loss": "the loss is on response tokens only, always (the stage builds the labels)",
    "chat_template_path": "the OpenBezoar prompt format is used, not a chat template",
    "truncation_mode": "the stage keeps the prompt and cuts the response at max_length",
    "packing": "use training.batching (examples: a batch holds that many examples; packed: that many rows of "
    "max_length tokens)",
    "padding_free": "batches are always padding-free (training.batching says what a batch counts)",
}
WRAPPED_REFUSED = ("'wrapped' cuts examples at row ends and lets a row's examples attend to each other: the stages "
                   "pack whole examples apart (bfd or bfd_split)")
_OWNED_DPO: dict[str, str] = {
    # TRL refuses it with a PEFT model (dpo_trainer.py: NotImplementedError): the reference is the sft-hh
    # model itself, the adapter switched off, so there is no second model to sync
    "sync_ref_model": "the reference is sft-hh's model with the LoRA adapter off; TRL cannot sync it under LoRA",
}
_OWNED_LORA: dict[str, str] = {
    "task_type": "always CAUSAL_LM",
    "base_model_name_or_path": "the stage sets the base model",
    "revision": "the stage sets the base model",
    "inference_mode": "the stage trains the adapter",
    "peft_type": "always LoRA",
}
_OWNED_PREFIXES = ("hub_", "push_to_hub_")


# ---------------------------------------------------------------------------------------------
# The device plan: QLoRA on CUDA, LoRA on CPU (or what the recipe forces)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DevicePlan:
    cuda: bool
    quantize_4bit: bool
    load_dtype: str  # dtype of the (non-quantized) weights while training: bfloat16 / float16 / float32
    compute_dtype: str  # 4-bit compute dtype
    bf16: bool
    fp16: bool
    description: str
    # the trainer shards the model over the ranks (FSDP: the recipe's fsdp, CUDA only); set by build_stage_configs
    fsdp: bool = False

    @property
    def mode(self) -> str:
        return "qlora-4bit" if self.quantize_4bit else "lora"

    @property
    def quant_storage(self) -> str | None:
        """FSDP-QLoRA: the dtype the 4-bit weights are packed into, so that FSDP, which shards floating-point
        tensors only, can shard them: the compute dtype, float32 for float16 compute (PEFT's FSDP-QLoRA guide:
        for stable fp16 mixed precision). None: bitsandbytes' default (uint8), for one rank or DDP."""
        if not (self.fsdp and self.quantize_4bit):
            return None
        return "float32" if self.compute_dtype == "float16" else self.compute_dtype


def detect_device() -> tuple[bool, bool]:
    """(CUDA available, bf16 supported on it). In a pod that asked for GPUs (``BEZOAR_GPUS``) CUDA must
    work: no silent fallback to CPU training (:mod:`bezoar_jobs.device_check`, exit 2)."""
    import torch

    from ..device_check import check

    check()
    cuda = torch.cuda.is_available()
    return cuda, bool(cuda and torch.cuda.is_bf16_supported())


def device_plan(training: TrainingConfig, cuda: bool, bf16_ok: bool) -> DevicePlan:
    """Decide quantization and precision from the recipe and the device (a pure function)."""
    if training.precision == "auto":
        precision = ("bf16" if bf16_ok else "fp16") if cuda else "fp32"
    else:
        precision = training.precision
    if not cuda and precision in ("bf16", "fp16"):
        raise BadInput(
            f"training.precision: {precision!r} needs a CUDA device; this machine has none (use auto or fp32)"
        )
    quant = training.quantization == "4bit" or (training.quantization == "auto" and cuda)
    load_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    compute: str
    if training.bnb_compute_dtype != "auto":
        compute = training.bnb_compute_dtype
    else:
        compute = load_dtype if cuda else "float32"
    if quant:
        where = "CUDA" if cuda else "CPU (bitsandbytes 4-bit on CPU: slow, for testing the code path)"
        desc = f"QLoRA: 4-bit NF4 weights with double quantization, {compute} compute, on {where}"
    else:
        desc = (
            f"LoRA on {load_dtype} weights on {'CUDA' if cuda else 'CPU'} - this is NOT QLoRA (no 4-bit quantization)"
        )
    return DevicePlan(cuda, quant, load_dtype, compute, precision == "bf16", precision == "fp16", desc)


# ---------------------------------------------------------------------------------------------
# Pass-through validation
# ---------------------------------------------------------------------------------------------
def _type_args(tp: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        out: tuple[Any, ...] = ()
        for a in typing.get_args(tp):
            out += _type_args(a)
        return out
    return (origin or tp,)


def _coerce(value: PassValue, tp: Any, path: str) -> Any:
    """YAML 1.1 reads ``2e-4`` as a string: turn such strings into the field's number type, and
    refuse values of an obviously wrong kind (the config class checks the rest)."""
    kinds = _type_args(tp)
    if isinstance(value, str) and str not in kinds and (float in kinds or int in kinds):
        try:
            return float(value) if float in kinds else int(value)
        except ValueError:
            raise BadInput(f"{path}: {value!r} is not a number") from None
    if isinstance(value, bool) and bool not in kinds and (int in kinds or float in kinds):
        raise BadInput(f"{path}: expected a number, got {value!r}")
    if kinds == (bool,) and not isinstance(value, bool):
        raise BadInput(f"{path}: expected true or false, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and float in kinds and int not in kinds:
        return float(value)
    return value


def check_pass_through(
    cls: type, args: dict[str, PassValue], path: str, owned: dict[str, str]
) -> dict[str, Any]:
    """Keys checked against ``dataclasses.fields(cls)`` and the owned list; values coerced."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    out: dict[str, Any] = {}
    for key, value in args.items():
        where = f"{path}.{key}"
        if key in owned or key.startswith(_OWNED_PREFIXES):
            why = owned.get(key, "use training.push")
            raise BadInput(f"{where}: set by the stage, not the recipe ({why})")
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise BadInput(f"{where}: unknown key: not a field of {cls.__name__}{hint}")
        out[key] = _coerce(value, fields[key].type, where)
    return out


def _construct(cls: type, kwargs: dict[str, Any], path: str, plan: DevicePlan) -> Any:
    """Build the config; for a CUDA plan on a machine without CUDA (validating a GPU recipe on a
    laptop or in CI) the class's hardware check is skipped by building for CPU and then setting
    the precision flags the GPU would use."""
    import torch

    emulate = plan.cuda and not torch.cuda.is_available()
    if emulate:
        kwargs = {**kwargs, "bf16": False, "fp16": False, "use_cpu": True}
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise BadInput(f"{path}: {cls.__name__} refused the settings: {e}") from None
    if emulate:
        obj.bf16, obj.fp16, obj.use_cpu = plan.bf16, plan.fp16, False
    return obj


def _report_to(training: TrainingConfig) -> list[str]:
    return list(training.report_to) or ["none"]


def _common_kwargs(
    training: TrainingConfig, seed: int, stage: str, output_dir: Path, plan: DevicePlan
) -> dict[str, Any]:
    return {
        "output_dir": str(output_dir),
        "save_strategy": "steps",
        "save_steps": training.checkpoint_every,
        "save_total_limit": 1,  # local copies only; the run store keeps training.keep_checkpoints
        "logging_strategy": "steps",
        "logging_steps": 1,
        "report_to": _report_to(training),
        "run_name": stage,
        "seed": seed,
        "data_seed": seed,
        "use_cpu": not plan.cuda,
        "bf16": plan.bf16,
        "fp16": plan.fp16,
        "disable_tqdm": True,
        "remove_unused_columns": True,
        "push_to_hub": False,
    }


def _cpu_optim(kwargs: dict[str, Any], plan: DevicePlan, log: logging.Logger | None = None) -> None:
    """Paged and 8-bit bitsandbytes optimizers need CUDA: fall back to AdamW on CPU, saying so."""
    optim = str(kwargs.get("optim", ""))
    if not plan.cuda and ("paged" in optim or "8bit" in optim or optim.startswith("adamw_bnb")):
        if log is not None:
            log.warning("optim %r needs CUDA; using adamw_torch on this CPU-only machine", optim)
        kwargs["optim"] = "adamw_torch"


def split_global_batch(kwargs: dict[str, Any], world_size: int, path: str) -> dict[str, Any]:
    """Keep the recipe's global batch on ``world_size`` ranks: the recipe's per_device_train_batch_size x
    gradient_accumulation_steps is what one optimizer step trains on, on one device. Each rank keeps the
    per-device batch and accumulates over fewer micro-batches when the world size divides the accumulation
    (so every rank's micro-batch is a micro-batch the one-device run also sees); otherwise the per-device
    batch is the largest divisor of the recipe's that makes the split exact. ``kwargs`` is changed in
    place; the split is returned (for the log and the manifest)."""
    b = int(kwargs.get("per_device_train_batch_size", 8))  # TrainingArguments' own default
    g = int(kwargs.get("gradient_accumulation_steps", 1))
    total = b * g
    split = {"world_size": world_size, "global_batch": total, "recipe_per_device_batch": b,
             "recipe_gradient_accumulation_steps": g}
    if world_size <= 1:
        return {**split, "per_device_batch": b, "gradient_accumulation_steps": g}
    per = next((d for d in range(b, 0, -1) if b % d == 0 and total % (d * world_size) == 0), None)
    if per is None:
        raise BadInput(
            f"{path}: the global batch of {total} (per_device_train_batch_size {b} x gradient_accumulation_steps "
            f"{g}) cannot be split evenly over {world_size} processes; choose a world size that divides {total}")
    accum = total // (per * world_size)
    kwargs["per_device_train_batch_size"], kwargs["gradient_accumulation_steps"] = per, accum
    return {**split, "per_device_batch": per, "gradient_accumulation_steps": accum}


def _distributed_kwargs(kwargs: dict[str, Any], plan: DevicePlan) -> None:
    """DDP settings a LoRA run wants unless the recipe says otherwise: every trained parameter (the
    adapter) is used in every step, so DDP need not search the graph for unused ones (and with
    gradient checkpointing it must not); gloo on CPU, NCCL on CUDA."""
    kwargs.setdefault("ddp_find_unused_parameters", False)
    kwargs.setdefault("ddp_backend", "nccl" if plan.cuda else "gloo")


def build_sft_config(training: TrainingConfig, seed: int, stage: str, settings: dict[str, PassValue], output_dir: Path,
                     plan: DevicePlan, log: logging.Logger | None = None, world_size: int = 1,
                     split: dict[str, Any] | None = None) -> Any:
    """The SFTConfig of one SFT stage from its effective settings (``training.sft_args`` with
    ``training.stage_args[stage]`` laid over them) and ours."""
    from trl import SFTConfig

    path = (
        "training.sft_args" if stage not in training.stage_args else f"training.sft_args / training.stage_args.{stage}"
    )
    kwargs = check_pass_through(SFTConfig, settings, path, {**_OWNED_COMMON, **_OWNED_SFT})
    _cpu_optim(kwargs, plan, log)
    _split(kwargs, world_size, path, plan, split, log)
    if not kwargs.get("max_length"):
        raise BadInput(f"{path}.max_length: must be set (the stage tokenizes and cuts examples to it)")
    kwargs.update(_common_kwargs(training, seed, stage, output_dir, plan))
    if training.batching == "packed":
        # tokens per step: per_device_train_batch_size rows of max_length, each packed with whole examples
        kwargs["packing"] = True
        kwargs.setdefault("packing_strategy", "bfd")
        if kwargs["packing_strategy"] == "wrapped":
            raise BadInput(f"{path}.packing_strategy: {WRAPPED_REFUSED}")
    else:
        # examples per step, as the QLoRA reference: a batch is per_device_train_batch_size examples,
        # flattened into one sequence without padding
        if "packing_strategy" in kwargs:
            raise BadInput(f"{path}.packing_strategy: only used with training.batching: packed")
        kwargs["packing"] = False
        kwargs["padding_free"] = True
    # we hand over tokenized, labelled rows already cut to max_length
    kwargs["dataset_kwargs"] = None
    kwargs["completion_only_loss"] = None
    if kwargs.get("padding_free") and not kwargs.get("packing"):
        # TRL refuses padding-free without packing when max_length is set, because it would not
        # truncate; our rows are already cut to max_length, so the limit is kept by construction.
        kwargs["max_length"] = None
    return _construct(SFTConfig, kwargs, path, plan)


def build_dpo_config(training: TrainingConfig, seed: int, settings: dict[str, PassValue], output_dir: Path,
                     plan: DevicePlan, log: logging.Logger | None = None, world_size: int = 1,
                     split: dict[str, Any] | None = None) -> Any:
    from trl import DPOConfig

    path = "training.dpo.dpo_args"
    kwargs = check_pass_through(DPOConfig, settings, path, {**_OWNED_COMMON, **_OWNED_DPO})
    _cpu_optim(kwargs, plan, log)
    _split(kwargs, world_size, path, plan, split, log)
    if not kwargs.get("max_length"):
        raise BadInput(f"{path}.max_length: must be set (prompts longer than it are refused or dropped)")
    kwargs.update(_common_kwargs(training, seed, "dpo", output_dir, plan))
    return _construct(DPOConfig, kwargs, path, plan)


def _fsdp(kwargs: dict[str, Any], path: str, plan: DevicePlan, world_size: int, log: logging.Logger | None) -> None:
    """Check and complete the recipe's FSDP settings (``fsdp``, ``fsdp_config``: TrainingArguments fields).

    - CUDA only: accelerate 1.15 turns its FSDP plugin on only for GPU (and other accelerator) process
      groups (``AcceleratorState.__init__``, ``accelerate/state.py``: the ``DistributedType.FSDP`` switch sits
      under ``distributed_type in [MULTI_GPU, MULTI_NPU, ...]``, MULTI_CPU is not among them); on CPU the
      Trainer would silently train plain DDP with every parameter on every rank.
    - FULL_STATE_DICT only: rank 0 uploads a checkpoint from its own directory, where a sharded state dict
      would hold rank 0's shard alone.
    - FSDP + QLoRA, as PEFT's FSDP-QLoRA guide sets it up: rank 0 reads the checkpoint and the others get
      the weights by broadcast (``cpu_ram_efficient_loading``); FSDP1 (``version: 1``) keeps
      ``use_orig_params: false`` (its memory saving with frozen and trainable parameters in one unit) and
      ``sync_module_states`` (which the broadcast needs). The loader packs the 4-bit weights into
      :attr:`DevicePlan.quant_storage` and loads without a device map (bezoar_jobs.training.lora).
    The recipe's own ``fsdp_config`` values win over these defaults."""
    if not plan.cuda:
        raise BadInput(f"{path}.fsdp: FSDP needs CUDA GPUs: accelerate turns FSDP on for GPU process groups only, "
                       "and on CPU (gloo) the Trainer would silently run DDP; leave fsdp unset on CPU")
    raw = kwargs.get("fsdp_config") or {}
    if not isinstance(raw, dict):
        raise BadInput(f"{path}.fsdp_config: give it inline as a mapping (the stage completes it), not {raw!r}")
    cfg = {str(k).removeprefix("fsdp_"): v for k, v in raw.items()}  # TrainingArguments' own normalisation
    state = str(cfg.get("state_dict_type", "FULL_STATE_DICT"))
    if state != "FULL_STATE_DICT":
        raise BadInput(f"{path}.fsdp_config.state_dict_type: {state}: only FULL_STATE_DICT (rank 0 uploads each "
                       "checkpoint from its own directory; a sharded state dict leaves the other ranks' shards in "
                       "theirs)")
    if plan.quantize_4bit:
        cfg.setdefault("cpu_ram_efficient_loading", True)
        if int(cfg.get("version", 2)) == 1:
            cfg.setdefault("use_orig_params", False)
            cfg.setdefault("sync_module_states", True)
    kwargs["fsdp_config"] = cfg
    if world_size == 1 and log is not None:
        log.warning("%s.fsdp on one process shards nothing (start the stage with --nproc-per-node N)", path)


def _split(kwargs: dict[str, Any], world_size: int, path: str, plan: DevicePlan, out: dict[str, Any] | None,
           log: logging.Logger | None = None) -> None:
    if world_size > 1 and kwargs.get("auto_find_batch_size"):
        # the Trainer halves one rank's batch on its own out-of-memory error: the ranks then step on different
        # batches (the global batch broken) and wait on each other's collectives (a hang)
        raise BadInput(f"{path}.auto_find_batch_size: not with {world_size} training processes (each rank would "
                       "shrink its own batch); set per_device_train_batch_size")
    if kwargs.get("fsdp"):
        _fsdp(kwargs, path, plan, world_size, log)
    got = split_global_batch(kwargs, world_size, path)
    if world_size > 1:
        _distributed_kwargs(kwargs, plan)
    if out is not None:
        out.update(got)


def build_lora_config(args: dict[str, PassValue], path: str) -> Any:
    from peft import LoraConfig

    kwargs = check_pass_through(LoraConfig, args, path, _OWNED_LORA)
    kwargs["task_type"] = "CAUSAL_LM"
    try:
        return LoraConfig(**kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise BadInput(f"{path}: LoraConfig refused the settings: {e}") from None


def check_report_to(training: TrainingConfig) -> None:
    """The loggers the recipe asks for must be installed (a missing one is a setup error, exit 2)."""
    from transformers.integrations import is_mlflow_available, is_tensorboard_available, is_wandb_available

    for name, ok in (("tensorboard", is_tensorboard_available), ("wandb", is_wandb_available),
                     ("mlflow", is_mlflow_available)):
        if name in training.report_to and not ok():
            raise BadInput(f"training.report_to: {name!r} is asked for but the {name} package is not installed "
                           "(pip install 'bezoar-jobs[tracking]')")


@dataclass
class StageConfigs:
    """Everything a training stage needs from the recipe, built and validated up front: computed
    once, here, and used by the trainer, the model card and the manifest."""

    stage: str
    plan: DevicePlan
    trainer_args: Any  # SFTConfig or DPOConfig
    lora: Any  # LoraConfig
    base_stage: str | None  # the stage whose model/ this one starts from; None: recipe.student
    settings: dict[str, PassValue]  # the effective SFTConfig/DPOConfig overrides (recipe defaults included)
    lora_settings: dict[str, PassValue]  # the effective LoraConfig overrides
    # the global batch and how it is split over the ranks (world_size 1: one process)
    distributed: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def max_length(self) -> int:
        return int(self.settings["max_length"])  # type: ignore[arg-type]


def build_stage_configs(training: TrainingConfig, seed: int, stage: str, output_dir: Path,
                        plan: DevicePlan | None = None, log: logging.Logger | None = None,
                        world_size: int | None = None) -> StageConfigs:
    """Validate and build one training stage's configuration (sft-*, dpo). Works on CPU for a GPU
    recipe: pass ``plan`` to build for another device than this one. ``world_size``: the processes
    the stage runs on (default: this process's group, WORLD_SIZE), over which the global batch is split."""
    from ..ranks import world

    if plan is None:
        plan = device_plan(training, *detect_device())
    ws = world().size if world_size is None else world_size
    split: dict[str, Any] = {}
    if stage == "dpo":
        settings = dict(training.dpo.dpo_args)
        args = build_dpo_config(training, seed, settings, output_dir, plan, log, ws, split)
        lora_settings = training.dpo_lora()
        lora_path = "training.dpo.lora" if training.dpo.lora is not None else "training.lora"
    elif stage in SFT_STAGES:
        settings = training.stage_sft_args(stage)
        args = build_sft_config(training, seed, stage, settings, output_dir, plan, log, ws, split)
        lora_settings, lora_path = dict(training.lora), "training.lora"
    else:
        raise BadInput(f"{stage}: not a training stage")
    lora = build_lora_config(lora_settings, lora_path)
    if args.fsdp:  # TrainingArguments turned the recipe's fsdp (True or the legacy strings) into True
        plan = dataclasses.replace(plan, fsdp=True)
        split["sharding"] = f"fsdp{args.fsdp_config.get('version', 2)}"
        if plan.quant_storage is not None:
            split["bnb_4bit_quant_storage"] = plan.quant_storage
    elif ws > 1:
        split["sharding"] = "ddp"
    base = training.previous_stage(stage)  # the same chain pipeline.stage_inputs() schedules
    return StageConfigs(stage, plan, args, lora, base, settings, lora_settings, split)
