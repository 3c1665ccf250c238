"""eval-harness data-parallel on the hf backend: every process of the stage (started by
:mod:`bezoar_jobs.launch`, ``evaluation.harness.data_parallel_size`` or ``--nproc-per-node``) runs a
share of each model's requests, and every rank ends with all the answers.

Why not lm_eval's own data parallelism (``accelerate launch -m lm_eval --model hf``), in lm_eval 0.4.13:

1. It does not start on CPU, nor for a model already loaded. ``HFLM.__init__``
   (``lm_eval/models/huggingface.py``) takes rank and world size from accelerate only in the branch
   ``elif gpus > 1:`` where ``gpus = torch.cuda.device_count()``; with no CUDA device, or when handed a
   loaded model (``pretrained`` not a string: this stage loads checkpoints itself, from the run's store),
   it sets rank 0 of 1 and every process would evaluate everything.
2. Where it runs, its scores depend on the number of GPUs. The evaluator shards *documents* before the
   few-shot prompts are built (``Task.build_all_requests(rank=, world_size=)``); a task's few-shot
   sampler is one seeded ``random.Random`` stepped once per document, so on rank r it starts at
   document r with the state a one-process run has at document 0, and documents get other few-shot
   examples (lm_eval marks this itself: "TODO: need to offset doc_id by rank now!" in
   ``lm_eval/api/task.py``). The per-document metrics are then gathered in rank order, which changes
   bootstrapped stderrs.

Here the evaluator sees one process: every rank builds every request exactly as a one-process run
does (building prompts is cheap next to the forward passes), and the model's three request methods
(``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) are split below it: rank r runs the
r-th contiguous slice of the request list (the choices of one document stay together, so their shared
context is still computed once per batch), and ``all_gather_object`` hands every rank all answers in
the original order. Every rank then scores exactly the answers of a one-process run (rank 0's result is
kept); only float rounding from other batch compositions can differ, and greedy generations could in
principle flip on a near tie, as with any change of batch size.

The collectives run over gloo (the answers are small Python objects); each rank's model is on its own
device (``cuda:LOCAL_RANK`` on GPUs, :func:`device_for`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from ..errors import BadInput
from ..ranks import world

log = logging.getLogger("bezoar")

# a rank waits at most this long for the others (model loading on one, the slowest share of a request type)
GROUP_TIMEOUT_S = 2 * 3600


def join_group() -> None:
    """Join the stage's process group (gloo) when it runs on several processes; a no-op otherwise."""
    me = world()
    if not me.distributed:
        return
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    log.info("eval-harness: rank %d of %d: each model's requests are split between the processes", me.rank, me.size)


def agree(done_on_zero: bool, stop_here: bool) -> tuple[bool, bool]:
    """(rank 0's ``done_on_zero``, whether any rank was asked to stop), the same on every rank: what is
    already evaluated (rank 0 alone reads and writes ``_work/``) and a SIGTERM are decided together, so
    no rank waits for a model the others skip."""
    if not world().distributed:
        return done_on_zero, stop_here
    import torch.distributed as dist

    votes: list[Any] = [None] * world().size
    dist.all_gather_object(votes, (bool(done_on_zero), bool(stop_here)))
    return bool(votes[0][0]), any(v[1] for v in votes)


def device_for(device: str) -> str:
    """The device this rank evaluates on: ``cuda:LOCAL_RANK`` when the recipe's device is CUDA and the
    stage runs on several processes (one GPU each), else the recipe's."""
    me = world()
    if not me.distributed:
        return device
    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not cuda:
        return device
    have = torch.cuda.device_count()
    if me.local_rank >= have:
        raise BadInput(f"evaluation.harness.data_parallel_size: {me.size} processes need a GPU each; this node has "
                       f"{have}")
    torch.cuda.set_device(me.local_rank)
    return f"cuda:{me.local_rank}"


def share(n: int, rank: int, size: int) -> tuple[int, int]:
    """The slice [lo, hi) of ``n`` requests that ``rank`` of ``size`` runs: contiguous, sizes differ by one at most."""
    return n * rank // size, n * (rank + 1) // size


def split_call(fn: Callable[..., list[Any]], requests: list[Any], disable_tqdm: bool) -> list[Any]:
    """``fn`` over this rank's share of ``requests``; every rank gets all the answers, in request order."""
    me = world()
    if not me.distributed:
        return fn(requests, disable_tqdm=disable_tqdm)
    import torch.distributed as dist

    lo, hi = share(len(requests), me.rank, me.size)
    mine = fn(requests[lo:hi], disable_tqdm=disable_tqdm or not me.zero) if hi > lo else []
    if len(mine) != hi - lo:  # pragma: no cover - lm_eval answers each request once
        raise RuntimeError(f"rank {me.rank}: {len(mine)} answers for {hi - lo} requests")
    log.info("eval-harness: rank %d ran requests %d-%d of %d (%s)", me.rank, lo, hi, len(requests),
             getattr(fn, "__name__", "requests"))
    parts: list[Any] = [None] * me.size
    dist.all_gather_object(parts, mine)
    out = [x for part in parts for x in part]
    if len(out) != len(requests):  # pragma: no cover - every rank built the same requests
        raise RuntimeError(f"{len(out)} answers for {len(requests)} requests: the ranks built different requests")
    return out


@functools.cache
def _split_hflm() -> type:
    from lm_eval.models.huggingface import HFLM

    class SplitHFLM(HFLM):
        """lm_eval's HFLM whose request methods run this rank's share (see the module docstring); to the
        evaluator it is one process (rank 0 of 1), so lm_eval shards nothing itself."""

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            return split_call(super().loglikelihood, requests, disable_tqdm)

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            return split_call(super().loglikelihood_rolling, requests, disable_tqdm)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            return split_call(super().generate_until, requests, disable_tqdm)

    return SplitHFLM


def hflm_class(world_size: int) -> type:
    """lm_eval's HFLM on one process; on several, the one whose requests are split between them."""
    if world_size <= 1:
        from lm_eval.models.huggingface import HFLM

        return HFLM
    return _split_hflm()
