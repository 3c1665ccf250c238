"""This process's place in a group of training processes started by torch.distributed.run.

A leaf module (the training library, the runner and the launcher read it): the launcher sets RANK,
WORLD_SIZE and LOCAL_RANK in each worker's environment; without a launcher a process is rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import BadInput


@dataclass(frozen=True)
class World:
    """This process's place in the group: (rank, world size, local rank); (0, 1, 0) without a launcher."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def zero(self) -> bool:
        return self.rank == 0


def world() -> World:
    env = os.environ
    try:
        return World(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        raise BadInput(f"RANK/WORLD_SIZE/LOCAL_RANK: not integers ({env.get('RANK')!r}, {env.get('WORLD_SIZE')!r}, "
                       f"{env.get('LOCAL_RANK')!r})") from None


# Besides the training stages (registry pod class "train"), the stages that run on several processes:
# eval-harness evaluates data-parallel (bezoar_jobs.eval.harness), each rank a share of every model's requests.
DATA_PARALLEL_STAGES: tuple[str, ...] = ("eval-harness",)


def runs_on_ranks(name: str, pod: str) -> bool:
    """Whether stage ``name`` (of registry pod class ``pod``) may run as a group of processes."""
    return pod == "train" or name in DATA_PARALLEL_STAGES
