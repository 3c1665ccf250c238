"""One concurrency budget for the teacher: the stages and shards that call it divide its capacity.

A TGI server admits ``--max-concurrent-requests`` (default 128) requests at once and answers 429
"Model is overloaded" to the next one; vLLM queues beyond ``--max-num-seqs``. The three generate
stages run side by side, each possibly in N shards, and each client keeps ``teacher.max_concurrency``
requests in flight: 3 x N x 64 would be 192..768 against 128 slots, a storm of 429s and, once a
record's retries run out, lost rows. So every pod that calls the teacher gets a share:

    share = capacity // parties            (at least 1; the cluster settings refuse fewer slots than parties)
    in flight per pod = min(teacher.max_concurrency, share)

so the total in flight never exceeds the capacity. ``capacity`` is what TGI reports at ``GET /info``
(``max_concurrent_requests``; for a fleet of replicas, llm/fleet.py, the sum of theirs), else the
configured ``BEZOAR_TEACHER_CAPACITY`` (the chart sets it from the server flag it passes: TGI
``--max-concurrent-requests``, vLLM ``--max-num-seqs``). The server's own answer wins when the two
differ (a hand-edited flag). ``parties`` is ``BEZOAR_TEACHER_PARTIES``: how many pods call the teacher's
server at once. The Kubernetes controller sets it to (the run's stages that call the teacher) x
``generationShards`` (a manifest rendered for ``kubectl apply``: every such stage of the recipe); the local
executor to the number of teacher stages in the run (they run side by side, executors/scheduler.py). A judge
served by the teacher's own server (an open judge at its ``/v1``) is a party too: its filter pods, and an
MT-Bench pod, get the same budget (:func:`plan`'s ``teacher``), and the count is the most that run at once (a
filter starts after its generate stage, so three generate stages and their filters are still three; MT-Bench
after the checkpoints it evaluates, beside the data stages only when those are early ones or the base model
alone: executors/scheduler.py ``on_teacher_server``, ``parties_at_once``). With neither a capacity nor parties
known, the recipe's ``max_concurrency`` stands alone (and is logged).

Shares move to the stages still running (:class:`Board`): the even share is each pod's floor. When a pod
is done with the teacher (its client closes) it leaves a marker in the run store
(``_control/teacher-shares/<stage>[.<shard>].done``, replacing the ``.live`` one it wrote when it
started); every pod still running reads the markers every ``POLL_S`` and takes ``capacity // left``,
up to the recipe's ``max_concurrency``, where ``left`` is ``parties - done`` but never fewer than the
pods marked running (a ``.done`` left by a stage of an earlier ``bezoar run`` that is not in this one
must not count; a pod killed before its client closed leaves its ``.live`` behind, which only keeps shares
smaller, until the scheduler's backend marks its stage done once the stage has ended unsuccessfully: a process
that exited non-zero, a Job failed for good; a controller killed with its stages leaves them). The pods
still running only ever divide what the finished ones no longer use, so the total in flight stays within
the capacity: TGI never answers "Model is overloaded" for it. The run store is what every stage pod
shares already (a local directory or S3), so this works the same for local processes and Kubernetes
pods, with no shared memory and no service to run. A pod that is started again (a retried Job) removes
its own marker first and starts from its floor; the others give back what they took within ``POLL_S``
(meanwhile the server may refuse a few requests as overloaded: the pool retries them).
A stage of the run's selection that was committed before (and so is skipped) is marked done by the
scheduler's backend when it skips it (:func:`mark_done`): its share goes to the stages that run.

Why not the server's own signal: TGI reports each answer's queue time (``x-queue-time``,
router/src/server.rs; the scripted server sends it too), and a pod could grow while answers do not
queue (AIMD). But when TGI decodes everything it admits, nothing queues until the admission limit,
and the only sign of too many is 429 "Model is overloaded": growing on it is probing with refusals,
which the budget exists to prevent.

This module is the one place that decides how many requests a teacher client may send.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import BadInput
from ..recipe_base import Endpoint

if TYPE_CHECKING:
    from ..store import Store
    from .fleet import Fleet

log = logging.getLogger("bezoar")

# the moving share (see the module docstring)
BOARD_PREFIX = "_control/teacher-shares/"
POLL_S = 2.0

CAPACITY_ENV = "BEZOAR_TEACHER_CAPACITY"
PARTIES_ENV = "BEZOAR_TEACHER_PARTIES"
BUDGETED_BACKENDS = ("tgi", "openai-completions")
INFO_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Budget:
    capacity: int | None  # the server's concurrent-request limit (None: unknown)
    source: str  # where the capacity came from
    parties: int  # pods sharing it
    share: int | None  # requests this pod may keep in flight (None: no limit from the budget)
    # a fleet's: each replica's own limit as its /info said (None: it did not), by its root URL; the client's
    # fleet takes these instead of asking every replica again (llm/pool.py ``use_fleet``)
    replicas: Mapping[str, int | None] = field(default_factory=dict)


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        v = int(raw)
    except ValueError:
        raise BadInput(f"{name}={raw!r}: expected a whole number") from None
    if v < 0:
        raise BadInput(f"{name}={raw!r}: must not be negative")
    return v or None


def tgi_info_capacity(base_url: str, api_key: str | None = None, timeout: float = INFO_TIMEOUT_S) -> int | None:
    """``max_concurrent_requests`` from a TGI server's ``GET /info``, or None when it does not say."""
    req = urllib.request.Request(base_url.rstrip("/") + "/info", headers={"Accept": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            info = json.loads(resp.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError, ValueError) as e:
        log.info("GET %s/info failed (%s): the server's admission limit is what the settings say, if anything",
                 base_url.rstrip("/"), e)
        return None
    v = info.get("max_concurrent_requests") if isinstance(info, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None  # JSON true is no capacity


def share(endpoint: Endpoint, api_key: str | None = None, environ: Mapping[str, str] | None = None,
          probe: Callable[[str, str | None], int | None] = tgi_info_capacity, fleet: Fleet | None = None) -> Budget:
    """This pod's share of the teacher's capacity (see the module docstring); ``fleet``: the teacher's replicas as
    the caller found them (llm/factory.py), not looked up again (a headless Service's name was resolved twice)."""
    env = os.environ if environ is None else environ
    parties = _int_env(env, PARTIES_ENV) or 1
    configured = _int_env(env, CAPACITY_ENV)
    capacity, source = configured, CAPACITY_ENV if configured else "unknown"
    replicas: dict[str, int | None] = {}
    if endpoint.backend == "tgi" and endpoint.base_url:
        # a fleet (llm/fleet.py): its capacity is every replica's
        from .fleet import Fleet

        fleet = fleet if fleet is not None else Fleet.from_env(endpoint.base_url, env)
        asked = {url: probe(url, api_key) for url in (sorted(fleet.replicas) if fleet is not None
                                                      else [endpoint.base_url])}
        replicas = asked if fleet is not None else {}
        reported = sum(n for n in asked.values() if n) if all(asked.values()) else None
        if reported:
            if configured and reported != configured:
                log.warning("teacher: TGI reports max_concurrent_requests=%d, the cluster settings say %d: "
                            "using the server's", reported, configured)
            capacity, source = reported, "TGI /info max_concurrent_requests"
    if capacity is None:
        return Budget(None, source, parties, None, replicas)
    if capacity < parties:
        raise BadInput(f"teacher: its capacity ({capacity} concurrent requests, from {source}) cannot be shared "
                       f"by {parties} pods ({PARTIES_ENV}): raise the server's limit or lower generationShards")
    return Budget(capacity, source, parties, capacity // parties, replicas)


class Board:
    """This pod's share as the others finish: a marker per party in the run store (module docstring)."""

    def __init__(self, store: Store, party: str, capacity: int, parties: int, ceiling: int):
        self.store, self.party = store, party
        self.capacity, self.parties = capacity, parties
        self.floor = max(1, min(ceiling, capacity // parties))
        self.ceiling = max(self.floor, ceiling)
        self.marker = f"{BOARD_PREFIX}{party}.done"
        self.live = f"{BOARD_PREFIX}{party}.live"
        mark_live(store, party)  # started again (a retried pod): not done any more

    def left(self) -> int:
        """The pods still sharing the teacher (this one included): the parties less those done, but never
        fewer than those running (a marker left by a stage of an earlier ``bezoar run`` that is not part of
        this one says nothing about this one's parties)."""
        try:
            names = self.store.list(BOARD_PREFIX)
        except Exception as e:  # a store hiccup: as if all were running, which is always safe
            log.info("teacher: could not read the shares in %s (%s)", BOARD_PREFIX, e)
            return self.parties
        done = sum(1 for p in names if p.endswith(".done") and p != self.marker)
        live = sum(1 for p in names if p.endswith(".live"))
        return max(1, live, self.parties - done)

    def share(self, left: int | None = None) -> int:
        """The requests this pod may keep in flight now (``left``: the pods still running, if known)."""
        left = self.left() if left is None else left
        return max(self.floor, min(self.ceiling, self.capacity // left))

    def done(self) -> None:
        """This pod sends the teacher nothing more: its share goes to the others."""
        mark_done(self.store, self.party)


def party_names(stage: str, shards: int = 1) -> list[str]:
    """The parties of ``stage`` on the board: the stage itself, or each of its shards (stages/common.py)."""
    return [stage] if shards <= 1 else [f"{stage}.{i}-of-{shards}" for i in range(shards)]


def mark_live(store: Store, party: str) -> None:
    """``party`` calls the teacher now, or is about to: the scheduler's backend marks a stage when it starts it,
    so the pods already running give up their part of its share before its first request, not ``POLL_S`` after
    (a filter that starts once its generate stage is done, into shares the others had just grown into); the
    pod marks itself again when its client opens (:class:`Board`)."""
    try:
        store.delete(f"{BOARD_PREFIX}{party}.done")
        store.write_text(f"{BOARD_PREFIX}{party}.live", f"{time.time():.3f}\n")
    except Exception as e:  # the share stays the floor; the stage goes on
        log.info("teacher: could not mark %s running (%s)", party, e)


def mark_done(store: Store, party: str) -> None:
    """``party`` sends the teacher nothing more in this run (it finished, or its stage was committed
    before and is skipped): its share goes to the pods still running."""
    try:
        store.write_text(f"{BOARD_PREFIX}{party}.done", f"{time.time():.3f}\n")
        store.delete(f"{BOARD_PREFIX}{party}.live")
    except Exception as e:  # the others keep their shares: slower, not wrong
        log.info("teacher: could not write %s%s.done (%s)", BOARD_PREFIX, party, e)


def plan(endpoint: Endpoint, role: str, api_key: str | None = None,
         environ: Mapping[str, str] | None = None, teacher: tuple[str, str] | None = None,
         teacher_here: bool = False, fleet: Fleet | None = None) -> tuple[Endpoint, Budget | None]:
    """The endpoint with ``max_concurrency`` cut to what it may keep in flight, and the budget whenever the
    capacity is known: the pool keeps everything it sends, duplicates included, within the share of a TGI
    server's admission limit (llm/pool.py), and with several pods the share moves (:class:`Board`, set up by
    stages/common.open_client). The one place that decides it for every role:

    * the teacher: its pod's even share of the teacher's capacity (teacher servers only);
    * a judge served by the teacher's own server (an open judge, llm/fleet.py ``on_teacher``; ``teacher``: that
      server's ``(base URL, backend)``): in a pod without the teacher's client (a filter, MT-Bench) it is one of the
      teacher's parties (the run counts it: executors/scheduler.py ``on_teacher_server``) and gets a share as a teacher
      stage's pod does; beside the teacher's client (``teacher_here``: an Evol-Instruct stage's equality checks)
      it goes through the teacher's books instead (llm/fleet.py ``Fleet.view``), so it has no budget of its own;
    * a judge on a TGI server of its own (:func:`alone`): within what that server admits;
    * any other (an API): no budget.

    ``fleet``: the teacher's replicas the caller found (llm/fleet.py), whose /info limits make the capacity."""
    if role == "teacher":
        if endpoint.backend not in BUDGETED_BACKENDS:
            return endpoint, None
        server = endpoint
    else:
        from .fleet import on_teacher

        if not on_teacher(endpoint.base_url, teacher[0] if teacher else None, environ):
            return alone(endpoint, role, api_key)
        if teacher_here or teacher is None or teacher[1] not in BUDGETED_BACKENDS:
            return endpoint, None
        server = endpoint.model_copy(update={"base_url": teacher[0], "backend": teacher[1]})
    b = share(server, api_key, environ, fleet=fleet)
    if b.share is None or b.capacity is None:
        log.info("%s: capacity unknown (no %s, no TGI /info): each of %d pod(s) keeps up to %d requests in "
                 "flight (%s.max_concurrency)", role, CAPACITY_ENV, b.parties, endpoint.max_concurrency, role)
        return endpoint, None
    n = min(endpoint.max_concurrency, b.share)
    log.info("%s: %d request(s) in flight at most: %d slots (%s%s) shared by %d pod(s)%s, recipe max_concurrency %d",
             role, n, b.capacity, b.source, "" if role == "teacher" else ", the teacher's server", b.parties,
             " while they all run (more as others finish)" if b.parties > 1 else "", endpoint.max_concurrency)
    return _capped(endpoint, n), b


def _capped(endpoint: Endpoint, n: int) -> Endpoint:
    """``endpoint`` with ``max_concurrency`` ``n`` (itself when it already is)."""
    return endpoint if n == endpoint.max_concurrency else endpoint.model_copy(update={"max_concurrency": n})


def alone(endpoint: Endpoint, role: str, api_key: str | None = None) -> tuple[Endpoint, Budget | None]:
    """A TGI server of the client's own (a judge not on the teacher's server): no other pod of the run shares
    it, but it admits no more at once than its ``/info`` says, and refuses the rest as overloaded. Without this
    the client's places there were twice its slots: a judge with 8 slots on a server admitting 8 took two
    halvings of its limit, each after most of 32 outcomes were refusals, to stop crowding the others there."""
    if endpoint.backend not in BUDGETED_BACKENDS:
        return endpoint, None
    b = share(endpoint, api_key, environ={})  # not the teacher's variables: this is another server
    if b.capacity is None:
        return endpoint, None
    n = min(endpoint.max_concurrency, b.capacity)
    log.info("%s: %d request(s) in flight at most: its server admits %d at once (%s), recipe max_concurrency %d",
             role, n, b.capacity, b.source, endpoint.max_concurrency)
    return _capped(endpoint, n), b


def apply(endpoint: Endpoint, role: str, api_key: str | None = None,
          environ: Mapping[str, str] | None = None) -> Endpoint:
    """The endpoint with ``max_concurrency`` cut to this pod's even share (teacher servers only)."""
    return plan(endpoint, role, api_key, environ)[0]
