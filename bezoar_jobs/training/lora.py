"""LoRA / QLoRA model setup for training, and merging an adapter into a full 16-bit checkpoint.

Loading for training (:func:`load_for_training`): the base is a local safetensors directory (from
:func:`bezoar_jobs.models.resolve_model` or a previous stage's committed ``model/``). With the
4-bit plan it loads as NF4 with double quantization and the plan's compute dtype (QLoRA) and is
prepared for k-bit training (PEFT); otherwise the weights load in the plan's dtype (plain LoRA).

Merging (:func:`merge_adapter`): the base is reloaded *unquantized* in float32 on the CPU (merging
into 4-bit weights would bake the quantization error into the release, and merging in 16 bits
rounds the small LoRA delta), the adapter is merged, and the result is cast to
``training.merge_dtype`` and written as safetensors with the tokenizer and generation config.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

from ..errors import BadInput
from ..ranks import world
from .config import DevicePlan

log = logging.getLogger("bezoar")


def _torch_dtype(name: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def check_model_dir(model_dir: Path, what: str) -> None:
    """A loadable checkpoint directory: config.json and safetensors weights, or pytorch_model*.bin
    (loaded weights-only, :func:`bezoar_jobs.models.weights_kwargs`)."""
    from ..models import check_model_dir as check

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BadInput(f"{what}: model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise BadInput(f"{what}: {model_dir} has no config.json: not a transformers checkpoint")
    check(model_dir, what)


def setup_tokenizer(tok: Any) -> Any:
    """Padding for training: pad = eos (or unk when there is no eos) when missing; right padding."""
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            raise BadInput("the tokenizer has no pad, eos or unk token to pad with")
    if tok.eos_token_id is None:
        raise BadInput("the tokenizer has no end-of-sequence token: responses could not end")
    tok.padding_side = "right"
    return tok


def load_tokenizer_for_training(model_dir: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BadInput(f"{model_dir}: cannot load a tokenizer: {e}") from None
    return setup_tokenizer(tok)


def load_for_training(
    model_dir: Path,
    plan: DevicePlan,
    trust_remote_code: bool,
    gradient_checkpointing: bool,
    attn_implementation: str | None = None,
) -> Any:
    """The base model ready for a LoRA adapter (4-bit NF4 + k-bit preparation for QLoRA)."""
    from transformers import AutoModelForCausalLM

    from ..models import weights_kwargs

    check_model_dir(model_dir, "base model")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **weights_kwargs(model_dir)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    kwargs.update(weights_placement(plan))
    if plan.fsdp and plan.quantize_4bit:
        import os

        # rank 0 alone reads the checkpoint, the others get the weights from FSDP's broadcast: transformers
        # reads this where `accelerate launch` would have set it (PEFT's FSDP-QLoRA guide, without the launcher)
        os.environ.setdefault("ACCELERATE_USE_FSDP", "true")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except (ValueError, ImportError) as e:
        if attn_implementation and attn_implementation in str(e):
            raise BadInput(f"training.attention: {attn_implementation!r} cannot be used here: {e}") from None
        raise
    except pickle.UnpicklingError as e:  # weights-only loading refused a pickle that is not just tensors
        raise BadInput(f"base model: {model_dir}: its pytorch_model*.bin cannot be loaded safely: {e}") from None
    if plan.quantize_4bit and not plan.fsdp:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif plan.quantize_4bit:
        # FSDP-QLoRA: no k-bit preparation, which would cast the non-4-bit weights to float32 beside 4-bit ones
        # packed in quant_storage (FSDP1 flattens one dtype per unit); the base is frozen by PEFT, and with
        # gradient checkpointing the embeddings' output must carry gradients to the checkpointed layers
        if gradient_checkpointing:
            model.enable_input_require_grads()
    model.config.use_cache = False  # no KV cache while training (and required by gradient checkpointing)
    return model


def weights_placement(plan: DevicePlan) -> dict[str, Any]:
    """``from_pretrained``'s quantization, dtype and placement for the plan.

    - QLoRA, one rank or DDP: NF4 with double quantization in the compute dtype, each rank's own 4-bit
      copy on its own GPU (``device_map={"": LOCAL_RANK}``), on CPU on the CPU.
    - QLoRA under FSDP (PEFT's and bitsandbytes' FSDP-QLoRA guides): the 4-bit weights packed into
      :attr:`DevicePlan.quant_storage` (a float dtype FSDP can shard), the model loaded in that dtype, and
      no device map: FSDP places the shards.
    - LoRA: the weights in the plan's dtype (FSDP or not: the trainer places them)."""
    if not plan.quantize_4bit:
        return {"dtype": _torch_dtype(plan.load_dtype)}
    from transformers import BitsAndBytesConfig

    compute = _torch_dtype(plan.compute_dtype)
    quant: dict[str, Any] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                             "bnb_4bit_compute_dtype": compute}
    if plan.quant_storage is not None:
        storage = _torch_dtype(plan.quant_storage)
        return {"quantization_config": BitsAndBytesConfig(**quant, bnb_4bit_quant_storage=storage), "dtype": storage}
    return {"quantization_config": BitsAndBytesConfig(**quant), "dtype": compute,
            # DDP: each rank loads its own 4-bit copy on its own GPU (LOCAL_RANK)
            "device_map": {"": world().local_rank} if plan.cuda else {"": "cpu"}}


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    merge_dtype: str,
    tokenizer: Any,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """Merge the LoRA adapter into an unquantized copy of the base; save a full checkpoint, its tokenizer with
    ``chat_template`` (the layout it was trained on: data/prompt_format.chat_template) when given."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..models import weights_kwargs

    base = AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=torch.float32, trust_remote_code=trust_remote_code, **weights_kwargs(base_dir)
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged = merged.to(_torch_dtype(merge_dtype))
    merged.config.use_cache = True
    merged.config.pad_token_id = tokenizer.pad_token_id
    gen = merged.generation_config
    if gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id
        if gen.eos_token_id is None:
            gen.eos_token_id = tokenizer.eos_token_id
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    padding_side, template = tokenizer.padding_side, getattr(tokenizer, "chat_template", None)
    tokenizer.padding_side = "left"  # the released tokenizer is set up for batched generation
    if chat_template is not None:
        tokenizer.chat_template = chat_template
        for stale in ("chat_template.jinja", "chat_template.json"):  # the base's own, copied by an earlier save
            (out_dir / stale).unlink(missing_ok=True)
    try:
        tokenizer.save_pretrained(str(out_dir))
    finally:
        tokenizer.padding_side, tokenizer.chat_template = padding_side, template
    n_params = sum(p.numel() for p in merged.parameters())
    del merged, base
    return {"parameters": n_params, "dtype": merge_dtype}


def base_licence(model_dir: Path) -> str:
    """The ``license:`` of a model card's YAML header, or 'unknown'."""
    card = Path(model_dir) / "README.md"
    if not card.is_file():
        return "unknown"
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return "unknown"
    head = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    import yaml

    try:
        meta = yaml.safe_load(head) or {}
    except yaml.YAMLError:
        return "unknown"
    lic = meta.get("license") if isinstance(meta, dict) else None
    return str(lic) if lic else "unknown"
