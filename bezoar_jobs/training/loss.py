"""The SFT loss on response tokens, projecting only those positions through the LM head.

The loss of an SFT stage covers response tokens only (the prompt and any padding carry label
-100), so the LM head's logits at every other position are wasted work, and with a 32-49k token
vocabulary that head is a large share of a small model's compute. TRL's fused LM head skips those
positions only where it runs its Triton kernel (CUDA/XPU); elsewhere (CPU) it scores every
position, pads and prompts included, then zeroes them. :func:`response_nll` gathers the hidden
states whose next-token label is real and projects only those, in chunks, with the chunks
recomputed in the backward pass when their logits would be large.

:func:`sft_trainer_class` returns TRL's ``SFTTrainer`` with that loss where it helps (no Triton,
plain NLL loss, no custom loss function) and TRL's own ``compute_loss`` everywhere else. It logs
``mean_token_accuracy`` like TRL; the per-token entropy TRL also logs is not computed on this path.

:func:`compact_fused_head` is the same saving for the trainers that keep TRL's loss (DPO): while it
is active, TRL's fused head takes its compact path (only labelled positions) on the CPU too, with
TRL's own torch fallback kernels. TRL scores every position off-Triton to keep tile shapes fixed
for graph compilers, which eager CPU training does not use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# positions x vocabulary above which a chunk's logits are recomputed in backward instead of kept
_KEEP_LOGITS_MAX = 1 << 26  # 64M floats = 256 MiB
_CHUNK_TOKENS = 2048


def _chunk(hidden: Any, weight: Any, bias: Any, targets: Any) -> tuple[Any, Any]:
    import torch.nn.functional as F

    logits = F.linear(hidden, weight, bias).float()
    nll = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.detach().argmax(-1) == targets).sum()
    return nll, correct


def response_nll(hidden: Any, labels: Any, lm_head: Any, position_ids: Any = None) -> tuple[Any, Any, Any]:
    """(summed NLL, number of scored tokens, number predicted right) of the next-token labels.

    ``hidden``: (batch, length, dim) final hidden states; ``labels``: (batch, length), -100 = not
    scored. A position whose ``position_ids`` is 0 starts an example, so it is never a target.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    targets = labels[:, 1:]
    mask = targets != -100
    if position_ids is not None:
        mask = mask & (position_ids[:, 1:].expand_as(targets) != 0)
    picked = hidden[:, :-1][mask]  # (n, dim): only the positions that are scored
    tgt = targets[mask]
    weight, bias = lm_head.weight, lm_head.bias
    n = int(tgt.numel())
    if n == 0:
        # keep the graph connected so an all-prompt micro-batch backpropagates a zero
        zero = hidden.sum() * 0.0
        return zero, torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)
    recompute = n * weight.shape[0] > _KEEP_LOGITS_MAX
    total, correct = None, torch.zeros((), dtype=torch.long, device=tgt.device)
    for s in range(0, n, _CHUNK_TOKENS):
        h, y = picked[s : s + _CHUNK_TOKENS], tgt[s : s + _CHUNK_TOKENS]
        if recompute and torch.is_grad_enabled():
            nll, ok = checkpoint(_chunk, h, weight, bias, y, use_reentrant=False)
        else:
            nll, ok = _chunk(h, weight, bias, y)
        total = nll if total is None else total + nll
        correct = correct + ok
    return total, torch.tensor(n, device=tgt.device), correct


@contextmanager
def compact_fused_head(enabled: bool = True) -> Iterator[bool]:
    """While active, TRL's fused LM head scores only labelled positions on CPU devices as well.

    Yields whether it took effect: TRL decides compact vs. every position with
    ``trl.trainer.utils._use_triton(device)``; a TRL without that hook keeps its behaviour
    (tests/test_training.py fails then, so an upgrade cannot drop the saving silently).
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if not enabled or original is None:
        yield False
        return

    def compact_on_cpu(device: Any) -> bool:
        return True if getattr(device, "type", None) == "cpu" else bool(original(device))

    trl_utils._use_triton = compact_on_cpu
    try:
        yield True
    finally:
        trl_utils._use_triton = original


def _unwrap(model: Any) -> Any:
    """The transformers model under PEFT and accelerate wrappers."""
    inner = getattr(model, "module", model)  # DDP
    get_base = getattr(inner, "get_base_model", None)
    return get_base() if callable(get_base) else inner


def uses_response_head(trainer: Any, model: Any, return_outputs: bool) -> bool:
    """Our loss applies: CPU (TRL scores every position there), plain NLL, nothing custom."""
    args = trainer.args
    if return_outputs or trainer.compute_loss_func is not None or trainer.label_smoother is not None:
        return False
    if getattr(args, "loss_type", "nll") != "nll" or getattr(trainer, "aux_loss_enabled", False):
        return False
    if model is not _unwrap(model) and type(model).__name__ == "DistributedDataParallel":
        # the response head calls the backbone directly; under DDP the forward must go through the wrapper
        # (it prepares the gradient all-reduce), so a group takes TRL's loss: the same value (a test shows it)
        return False
    if getattr(trainer, "is_fsdp_enabled", False):
        # likewise under FSDP: the root module's forward gathers the parameters it holds (embeddings, final
        # norm, LM head), which a direct call of the backbone would find still sharded
        return False
    device = next(model.parameters()).device
    return device.type == "cpu"


def sft_trainer_class() -> type:
    """``SFTTrainer`` whose loss on CPU projects only response positions through the LM head."""
    from trl import SFTTrainer

    class ResponseHeadSFTTrainer(SFTTrainer):
        used_response_head = False  # set once a loss went through the response-only head

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            if not uses_response_head(self, model, return_outputs):
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
            import torch

            self.used_response_head = True
            mode = "train" if self.model.training else "eval"
            base = _unwrap(model)
            backbone = getattr(base, base.base_model_prefix)
            feed = {k: v for k, v in inputs.items() if k != "labels"}
            feed["use_cache"] = False
            hidden = backbone(**feed).last_hidden_state
            nll, n, correct = response_nll(
                hidden, inputs["labels"], base.get_output_embeddings(), inputs.get("position_ids")
            )
            denom = num_items_in_batch if num_items_in_batch is not None else n.clamp(min=1)
            loss = nll / torch.as_tensor(denom, device=nll.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            n_all = self.accelerator.gather_for_metrics(n.reshape(1)).sum()
            c_all = self.accelerator.gather_for_metrics(correct.reshape(1)).sum()
            self._metrics[mode]["mean_token_accuracy"].append((c_all / n_all).item() if n_all > 0 else 0.0)
            if mode == "train":
                if "attention_mask" in inputs:
                    tokens = int(inputs["attention_mask"].sum())
                else:
                    tokens = int(inputs["input_ids"].numel())
                self._total_train_tokens += tokens
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return ResponseHeadSFTTrainer
