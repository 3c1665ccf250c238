"""The few collectives the training loop needs when a stage runs on several ranks (bezoar_jobs.launch).

Each is a no-op returning the local value when the stage runs on one process or the process group is
not (yet) initialized. They are called by every rank at the same point of the loop (a step's end, a
checkpoint, the end of training): a rank that skipped one would leave the others waiting.
"""

from __future__ import annotations

from typing import Any


def _active() -> bool:
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _device() -> Any:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a SIGTERM seen by one rank stops all at the same step)."""
    if not _active():
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the ranks (token counters: each rank counts only its own batches)."""
    if not _active() or not values:
        return dict(values)
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (also a barrier)."""
    if not _active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _active():
        import torch.distributed as dist

        dist.barrier()
