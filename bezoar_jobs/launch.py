"""One training stage on N processes per node and M nodes, under PyTorch's own elastic launcher.

``bezoar stage sft-lamini --nproc-per-node 2`` (or ``--nnodes M`` in a Kubernetes Indexed Job) does not
launch workers itself: it hands the same ``bezoar stage`` command line to ``torch.distributed.run``
(torchrun) in this process, which starts the workers with RANK / WORLD_SIZE / LOCAL_RANK set. Each
worker then runs the stage as usual; :mod:`bezoar_jobs.runner` and :mod:`bezoar_jobs.stages.training`
read :func:`bezoar_jobs.ranks.world` to let rank 0 alone take the lease, write checkpoints, metrics and the merged model
and commit.

Rendezvous: one node is standalone (a local rendezvous on a free port); on several nodes it is torch's
static rendezvous on node 0 (``--master-addr``, ``--master-port``), the node's rank from ``--node-rank``
or, in an Indexed Job, the pod's ``JOB_COMPLETION_INDEX``. torchrun restarts nothing (``--max-restarts
0``): a failed or stopped group is one failed attempt of the stage, retried as a whole by the scheduler
or the Job's backoff, and every rank resumes from the same committed checkpoint.

torchrun itself exits 1 whatever its workers exit with; the stage contract needs the worker's own
code (2: bad input, do not retry; 143: stopped by SIGTERM), so :func:`launch` takes the code of the
first worker that failed from the launcher's ``ChildFailedError``.

torch is imported inside :func:`launch` only (the controller never launches a stage).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import EXIT_INTERRUPTED, EXIT_RETRYABLE, BadInput
from .ranks import World, world

__all__ = ["LAUNCHED", "Shape", "World", "add_flags", "launch", "launch_needed", "launch_stage", "processes_per_node",
           "world"]

if TYPE_CHECKING:
    from .recipe import Recipe
    from .store import Store

log = logging.getLogger("bezoar")

DEFAULT_PORT = 29500
LAUNCHED = "BEZOAR_LAUNCHED"  # set in the workers' environment: never launch again from a worker


@dataclass(frozen=True)
class Shape:
    """How many processes one stage runs on: ``nproc_per_node`` x ``nnodes``."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int | None = None  # None: JOB_COMPLETION_INDEX (an Indexed Job's pod), else 0
    master_addr: str | None = None  # node 0's address; None: standalone (one node only)
    master_port: int = DEFAULT_PORT

    @property
    def processes(self) -> int:
        return self.nproc_per_node * self.nnodes

    def check(self) -> None:
        if self.nproc_per_node < 1:
            raise BadInput(f"--nproc-per-node {self.nproc_per_node}: must be at least 1")
        if self.nnodes < 1:
            raise BadInput(f"--nnodes {self.nnodes}: must be at least 1")
        if self.nnodes > 1 and not self.master_addr:
            raise BadInput(f"--nnodes {self.nnodes}: several nodes need --master-addr (node 0's address), "
                           "e.g. the headless Service name of an Indexed Job's pod 0")
        if not 0 < self.master_port < 65536:
            raise BadInput(f"--master-port {self.master_port}: not a port")

    def rank_of_node(self) -> int:
        if self.node_rank is not None:
            rank = self.node_rank
        else:
            raw = os.environ.get("JOB_COMPLETION_INDEX", "0")
            try:
                rank = int(raw)
            except ValueError:
                raise BadInput(f"JOB_COMPLETION_INDEX {raw!r}: not an integer (the node rank)") from None
        if not 0 <= rank < self.nnodes:
            raise BadInput(f"node rank {rank}: must be in 0..{self.nnodes - 1} (--nnodes {self.nnodes})")
        return rank


def launcher_args(shape: Shape, stage_argv: list[str]) -> list[str]:
    """torchrun's arguments that run ``python -m bezoar_jobs.cli <stage_argv>`` on every worker."""
    shape.check()
    args = [f"--nproc-per-node={shape.nproc_per_node}", f"--nnodes={shape.nnodes}", "--max-restarts=0",
            "--monitor-interval=0.5"]
    if shape.nnodes == 1 and not shape.master_addr:
        args.append("--standalone")
    else:
        args += [f"--node-rank={shape.rank_of_node()}", f"--master-addr={shape.master_addr}",
                 f"--master-port={shape.master_port}", "--rdzv-backend=static"]
    return [*args, "--module", "bezoar_jobs.cli", *stage_argv]


def parse_launcher_args(shape: Shape, stage_argv: list[str]) -> object:
    """torchrun's parsed arguments. The stage's own arguments are set after parsing: torchrun's parser
    would take ``--run`` for an abbreviation of its ``--run-path``."""
    from torch.distributed.run import parse_args

    args = parse_args(launcher_args(shape, []))
    args.training_script_args = list(stage_argv)
    return args


def worker_exit_code(exc: BaseException) -> int:
    """The stage's exit code from the launcher's ``ChildFailedError``: the first failed worker's own
    code (2 stays 2, so a bad recipe is not retried); a worker killed by a signal: 128 + signal."""
    failures = getattr(exc, "failures", None)
    if not failures:
        return EXIT_RETRYABLE
    first = min(failures, key=lambda r: failures[r].timestamp)
    code = int(failures[first].exitcode)
    return 128 - code if code < 0 else code or EXIT_RETRYABLE


def launch(shape: Shape, stage_argv: list[str]) -> int:
    """Run the stage under torch.distributed.run in this process; the stage's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    log.info("launching %d process(es) per node on %d node(s): torchrun %s", shape.nproc_per_node, shape.nnodes,
             " ".join(launcher_args(shape, stage_argv)))
    parsed = parse_launcher_args(shape, stage_argv)
    os.environ[LAUNCHED] = "1"  # inherited by the workers
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, said here so it is not a warning
    # on SIGTERM the launcher passes it on and gives the workers this long to save a checkpoint before SIGKILL
    # (torch's default, 30 s, is short for a checkpoint upload; a pod gets its grace period minus a margin)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "240")
    try:
        run(parsed)
    except ChildFailedError as e:
        code = worker_exit_code(e)
        failures = e.failures
        rank = min(failures, key=lambda r: failures[r].timestamp)
        log.error("worker rank %d failed with exit code %d; the group was stopped", rank, code)
        return code
    except SignalException as e:  # SIGTERM/SIGINT to the launcher: the workers got it and saved what they could
        log.warning("launcher stopped by %s", e.sigval.name if hasattr(e.sigval, "name") else e.sigval)
        return EXIT_INTERRUPTED
    sys.stdout.flush()
    return 0


def add_flags(s: argparse.ArgumentParser) -> None:
    """``bezoar stage``'s flags for N processes per node x M nodes (training stages, eval-harness)."""
    g = s.add_argument_group("distributed training (sft-*, dpo) and data-parallel evaluation (eval-harness)")
    g.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="processes on this node (one per GPU; gloo on CPU). Default 1; eval-harness: the recipe's "
                   "evaluation.harness.data_parallel_size (backend hf)")
    g.add_argument("--nnodes", type=int, default=1, metavar="M", help="nodes (an Indexed Job's pods)")
    g.add_argument("--node-rank", type=int, metavar="I", help="this node's rank (default: JOB_COMPLETION_INDEX, or 0)")
    g.add_argument("--master-addr", metavar="HOST", help="node 0's address (several nodes)")
    g.add_argument("--master-port", type=int, default=DEFAULT_PORT, metavar="PORT")


def processes_per_node(a: argparse.Namespace, recipe: Recipe | None = None) -> int:
    """``--nproc-per-node`` when given; for eval-harness with the hf backend otherwise the recipe's
    ``evaluation.harness.data_parallel_size`` (a pod runs the plain ``bezoar stage eval-harness`` command); 1."""
    if a.nproc_per_node is not None:
        return int(a.nproc_per_node)
    if recipe is not None and getattr(a, "name", None) == "eval-harness":
        h = recipe.evaluation.harness
        if h.enabled and h.backend == "hf":
            return h.data_parallel_size
    return 1


def launch_needed(a: argparse.Namespace, recipe: Recipe | None = None) -> bool:
    """``bezoar stage`` asked for several processes, and this is not already one of the launched workers."""
    return processes_per_node(a, recipe) * a.nnodes > 1 and not os.environ.get(LAUNCHED)


def launch_stage(a: argparse.Namespace, recipe: Recipe, store: Store) -> int:
    """``bezoar stage NAME --nproc-per-node N [--nnodes M ...]``: a training stage (or eval-harness,
    data-parallel) on several processes."""
    from .ranks import runs_on_ranks
    from .registry import spec
    from .state import up_to_date

    procs = processes_per_node(a, recipe)
    shape = Shape(procs, a.nnodes, a.node_rank, a.master_addr, a.master_port)
    if not runs_on_ranks(a.name, spec(a.name).pod):
        raise BadInput(f"--nproc-per-node/--nnodes: {a.name} is not a training stage (only sft-*, dpo and "
                       "eval-harness run on several processes)")
    if a.name == "eval-harness":
        h = recipe.evaluation.harness
        if h.backend != "hf":
            raise BadInput(f"--nproc-per-node/--nnodes with evaluation.harness.backend {h.backend!r}: vLLM runs its "
                           "replicas itself in one process (evaluation.harness.data_parallel_size)")
        if a.nproc_per_node is not None and h.data_parallel_size not in (1, procs):
            log.info("eval-harness: --nproc-per-node %d overrides evaluation.harness.data_parallel_size %d", procs,
                     h.data_parallel_size)
    if a.shard:
        raise BadInput("--shard with --nproc-per-node/--nnodes: a sharded stage runs as separate shards")
    if not a.force:
        ok, why = up_to_date(store, recipe, a.name)
        if ok:
            log.info("%s: already committed (%s)", a.name, why)
            return 0
    argv = ["stage", a.name, "--recipe", a.recipe, "--run", a.run] + (["--force"] if a.force else [])
    return launch(shape, argv)
