"""A teacher served by several replicas: requests spread over them one by one, not pinned by connections.

A ClusterIP Service balances *connections*; a client that keeps a few keep-alive connections open
sends everything to the few pods they landed on. So a fleet client picks a replica for every request:
the healthy one with the fewest of our requests in flight (ties in turn). Where the replicas come from:

* ``BEZOAR_TEACHER_ENDPOINTS``: base URLs, comma-separated (``http://tgi-0:80,http://tgi-1:80``);
* ``BEZOAR_TEACHER_DISCOVERY=dns``: every address the host of ``teacher.base_url`` resolves to (a
  headless Service: one A record per ready pod), looked up again every ``DNS_EVERY_S`` seconds, so
  replicas that come and go are followed.

Health: a replica whose request fails the way a dead or sick server fails (connection refused or
reset, a timeout, a 5xx, an abandoned attempt) is taken out for ``EJECT_S`` seconds (doubling with
each failure in a row, up to ``EJECT_MAX_S``); then a ``GET /health`` (TGI's readiness route, 200
when it serves) decides whether it takes requests again. Its requests are retried by the pool on the
others (same seed: the same answer). A 429 says the replica is busy, not sick: it stays in. A 429/503
with ``Retry-After`` holds that request back from that replica only: the pool sends it again at once to
another live replica (none of them asked it to wait), and waits the Retry-After only when no other is. When
every replica is out, the one that comes back first is used (the pool's retries and backoff apply).

Each replica's limit (``Replica.room``: its ``/info`` admission limit over the pods sharing the fleet,
llm/budget.py) moves with what the replica answers (llm/gate.py :class:`Admission`, as a single server's
pool does): a replica refusing "Model is overloaded" for most of its recent outcomes has callers the budget
does not know of (a judge pointed at it, another run), and the client sends it half as many and the rest
to the others, growing back as it answers; and while it refuses most attempts, no more than the client still
has there for a moment (gate.py ``FULL_HOLD_S``: a stage's first burst bounced off a replica another client had
filled ~55 times in 40 ms). Before, such a replica refused thousands of requests a stage
(the bench's three generate stages on two replicas, the judge on one of them: ~5,900, and ~6% of the
decoding spent on duplicates).

A judge whose base URL is the teacher's server (an open judge served by the teacher itself: same scheme,
host and port as ``teacher.base_url`` or one of the listed replicas) uses the same fleet
(:meth:`Fleet.beside`), each replica at the judge's own path (``/v1`` for the OpenAI routes): pinned to the
one URL it names, it crowded that replica while the fleet kept its full share there. When the teacher's
client is in the same process (an Evol-Instruct stage's equality checks) the judge shares its books
(:meth:`Fleet.view`: one count of requests in flight, one limit and one health state per replica, behind a
lock, since each client's pool runs its own event loop thread), so the pod's requests at a replica, the
judge's included, stay within the pod's share there; with one teacher server and no fleet, that server is made
a fleet of one for the two (llm/pool.py ``RemoteClient.fleet_of_one``). With books of its own the judge came on
top of that share: the bench's three stages on two replicas saw one replica refuse the excess as overloaded, the
teacher's limit there was cut, and it stayed 0.80-0.89 busy for the rest of the run in 1 of 4-6 runs. A
replica taken out is asked ``/health`` at its root, whoever's path the client sends to.

Where the fleet is set: the chart sets the variables for the stage pods (docs/kubernetes.md); they
never change a stage's parameter hash (where the teacher is served is not what the data depends on).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from .gate import Admission

log = logging.getLogger("bezoar.llm")

ENDPOINTS_ENV = "BEZOAR_TEACHER_ENDPOINTS"
DISCOVERY_ENV = "BEZOAR_TEACHER_DISCOVERY"
DNS_EVERY_S = 30.0
EJECT_S = 1.0
EJECT_MAX_S = 30.0
HEALTH_TIMEOUT_S = 2.0

# the replica the current attempt goes to (set by the pool around ``_send``)
REPLICA: contextvars.ContextVar[str | None] = contextvars.ContextVar("bezoar_replica", default=None)


@dataclass
class Replica:
    url: str
    in_flight: int = 0
    failures: int = 0  # in a row
    out_until: float = 0.0  # ejected until then (monotonic); 0: in
    probing: bool = False
    sent: int = 0
    # requests it may have in flight from this client: its share of its capacity (ceiling), as its refusals move it
    places: Admission = field(default_factory=lambda: Admission(None))

    def take_out(self) -> float:
        """One more failure in a row: out for ``EJECT_S``, doubling with each, up to ``EJECT_MAX_S`` (the delay)."""
        self.failures += 1
        delay = min(EJECT_MAX_S, EJECT_S * 2 ** (self.failures - 1))
        self.out_until = time.monotonic() + delay
        return delay

    @property
    def room(self) -> int | None:
        """The requests it may have in flight from this client now (None: no limit known; less than its limit
        for a moment after it refused one as overloaded: llm/gate.py FULL_HOLD_S)."""
        return self.places.room()


class Fleet:
    def __init__(self, urls: list[str], dns_url: str | None = None):
        self.replicas: dict[str, Replica] = {u.rstrip("/"): Replica(u.rstrip("/")) for u in urls}
        self.dns_url = dns_url
        self.capacities: dict[str, int | None] = {}  # each replica's /info capacity (set_limits)
        self.path: str | None = None  # another client's path at each replica (a judge's); None: the replica's URL
        self.borrowed = False  # the books are another client's (:meth:`view`): it sets the limits
        # the books (replicas, their counts and limits) may be shared by clients on other threads (:meth:`view`)
        self.lock = threading.Lock()
        self._dns_at = 0.0
        self._turn = 0

    def view(self, path: str) -> Fleet:
        """This fleet for another client of the same servers in this process (a judge on the teacher's server,
        at its own ``path``): the same replicas, so what both have in flight at a replica counts against one
        limit (the pod's share of it), and a replica one finds sick or overloaded is so for the other."""
        other = Fleet([], self.dns_url)
        other.replicas, other.capacities, other.lock = self.replicas, self.capacities, self.lock
        other.path = path.rstrip("/")
        other.borrowed = True
        other._dns_at = self._dns_at
        return other

    def address(self, key: str) -> str:
        """The base URL to send to at replica ``key``: its own, or its server at this view's path."""
        if self.path is None:
            return key
        return urllib.parse.urlunsplit((*urllib.parse.urlsplit(key)[:2], self.path, "", ""))

    @classmethod
    def from_env(cls, base_url: str | None, environ: Mapping[str, str] | None = None) -> Fleet | None:
        env = os.environ if environ is None else environ
        urls = _listed(env)
        if urls:
            return cls(urls)
        if env.get(DISCOVERY_ENV, "").strip().lower() == "dns" and base_url:
            fleet = cls([], dns_url=base_url)
            fleet.resolve()
            return fleet
        return None

    # ------------------------------------------------------------------ membership
    @classmethod
    def beside(cls, base_url: str | None, teacher_url: str | None,
               environ: Mapping[str, str] | None = None, teacher: Fleet | None = None) -> Fleet | None:
        """The teacher's fleet for another client (a judge) whose ``base_url`` is the teacher's server, each
        replica at that client's own path; None when it is another server or the teacher has no fleet.
        ``teacher``: the teacher client's own fleet in this process (an Evol-Instruct stage's judge), whose books
        the judge then shares (:meth:`view`): with books of its own, the judge's requests were on top of the
        pod's share at each replica, which refused them as overloaded and was then cut for the teacher too."""
        env = os.environ if environ is None else environ
        if not base_url or not teacher_url or not on_teacher(base_url, teacher_url, env):
            return None  # another server (an API judge): the teacher's name is not even looked up
        path = urllib.parse.urlsplit(base_url).path
        if teacher is not None:
            return teacher.view(path)
        # no teacher client in this process (a filter stage's pod): the teacher's replicas (its Service looked up
        # once), each at the client's own path; each replica's /health is still asked at its root
        fleet = cls.from_env(teacher_url, env)
        if fleet is not None:
            fleet.path = path.rstrip("/")
        return fleet

    def resolve(self) -> None:
        """The headless Service's addresses, now (blocking: at start and every DNS_EVERY_S)."""
        assert self.dns_url is not None
        u = urllib.parse.urlsplit(self.dns_url)
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(u.hostname or "", port, type=socket.SOCK_STREAM)
        except OSError as e:
            log.warning("teacher fleet: %s does not resolve (%s); keeping %d replica(s)", u.hostname, e,
                        len(self.replicas))
            return
        urls = set()
        for family, _, _, _, addr in infos:
            host = f"[{addr[0]}]" if family == socket.AF_INET6 else addr[0]
            urls.add(urllib.parse.urlunsplit((u.scheme, f"{host}:{port}", u.path.rstrip("/"), "", "")))
        with self.lock:
            for url in urls - set(self.replicas):
                self.replicas[url] = Replica(url)
            for url in set(self.replicas) - urls:
                if self.replicas[url].in_flight == 0:
                    del self.replicas[url]
            self._dns_at = time.monotonic()
            if not self.replicas:  # nothing resolved: the Service name itself, as without a fleet
                self.replicas[self.dns_url.rstrip("/")] = Replica(self.dns_url.rstrip("/"))

    def urls(self) -> list[str]:
        """Where this client sends (each replica's address)."""
        return sorted(self.address(k) for k in self.replicas)

    # ------------------------------------------------------------------ per request
    def set_limits(self, capacity: Mapping[str, int | None], parties: int) -> None:
        """Each replica's share: its own capacity (TGI ``/info``) over the pods sharing the fleet (again with
        fewer ``parties`` as other pods finish: llm/budget.py)."""
        given = dict(capacity)  # before the clear: the pool passes this fleet's own ``capacities`` back
        with self.lock:
            self.capacities.clear()  # in place: a view (:meth:`view`) shares it
            self.capacities.update(given)
            for url, r in self.replicas.items():
                n = given.get(url)
                r.places.set_ceiling(max(1, n // parties) if n else None)

    async def acquire(self, loop: asyncio.AbstractEventLoop, avoid: Mapping[str, float] | None = None) -> str:
        """A replica with room for one more request (waits while every live replica is at its limit:
        with one replica out, the others are not asked for more than they admit); not one in ``avoid``
        before its time there (a replica that said Retry-After to this request), unless no other is live."""
        while True:
            url = self.pick(loop, avoid)
            r = self.replicas[url]
            if r.room is None or r.in_flight <= r.room:
                return url
            self.done(url, ok=True, count_only=True)
            await asyncio.sleep(0.02)

    def pick(self, probe: asyncio.AbstractEventLoop | None = None, avoid: Mapping[str, float] | None = None) -> str:
        """The replica for the next attempt (its in-flight count taken)."""
        now = time.monotonic()
        if self.dns_url and now - self._dns_at > DNS_EVERY_S:
            self.resolve()
        with self.lock:
            live = [r for r in self.replicas.values() if r.out_until == 0.0]
            if avoid:
                live = [r for r in live if avoid.get(r.url, 0.0) <= now] or live
            if probe is not None:
                for r in self.replicas.values():
                    if r.out_until and now >= r.out_until and not r.probing:
                        r.probing = True
                        probe.create_task(self._probe(r))
            if not live:  # every replica is out: the one back first
                live = [min(self.replicas.values(), key=lambda r: r.out_until)]
            self._turn += 1
            # the fullest for its limit last; a replica whose limit is unknown (a judge's own fleet, until one replica
            # is cut) as roomy as the most any had before a cut: counted as room for one, it took a tenth of what a
            # replica cut to 10 took, and the crowded replica got the most
            roomiest = max((r.places.ceiling or 0 for r in live), default=0) or 1

            def fullness(r: Replica) -> float:
                room = r.room
                return r.in_flight / (roomiest if room is None else room) if room != 0 else float("inf")

            best = min(live, key=lambda r: (fullness(r), (hash(r.url) + self._turn) % 997))
            best.in_flight += 1
            best.sent += 1
            return best.url

    def done(self, url: str, ok: bool, sick: bool = False, count_only: bool = False, overloaded: bool = False,
             who: Hashable | None = None) -> None:
        """An attempt (of request ``who``) at ``url`` is over: answered (``ok``), failed as a sick server fails
        (``sick``: taken out), refused as overloaded (its limit may drop), or neither (given up by the client)."""
        with self.lock:
            self._done(url, ok, sick, count_only, overloaded, who)

    def _done(self, url: str, ok: bool, sick: bool, count_only: bool, overloaded: bool, who: Hashable | None) -> None:
        r = self.replicas.get(url)
        if r is None:
            return
        r.in_flight -= 1
        if count_only:
            r.sent -= 1
            return
        if overloaded:
            cut = r.places.overloaded(r.in_flight, who)
            if cut is not None:
                log.info("teacher fleet: replica %s says it is overloaded: at most %d request(s) at it for now",
                         url, cut)
        elif ok:
            r.places.answered()
        elif sick:
            r.places.failed()
        if ok:
            r.failures = 0
        elif sick:
            was_in = r.out_until == 0.0
            delay = r.take_out()
            if was_in:
                log.warning("teacher fleet: replica %s taken out for %.0f s after a failure", url, delay)

    async def _probe(self, r: Replica) -> None:
        """GET /health of an ejected replica: back in on 200, out for longer otherwise."""
        import urllib.request

        def get() -> bool:
            try:
                with urllib.request.urlopen(r.url + "/health", timeout=HEALTH_TIMEOUT_S) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        try:
            healthy = await asyncio.get_running_loop().run_in_executor(None, get)
        finally:
            r.probing = False
        with self.lock:
            if healthy:
                r.out_until = 0.0
            else:
                r.take_out()
        if healthy:
            log.info("teacher fleet: replica %s is healthy again", r.url)


def _server(url: str) -> tuple[str, str, int]:
    """A base URL's server: scheme, host, port (the default port said or not)."""
    u = urllib.parse.urlsplit(url)
    return u.scheme, (u.hostname or "").lower(), u.port or (443 if u.scheme == "https" else 80)


def on_teacher(base_url: str | None, teacher_url: str | None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``base_url`` (a judge's) is served by the teacher's server: the same scheme, host and port as the
    teacher's URL or one of the replicas ``BEZOAR_TEACHER_ENDPOINTS`` lists, whatever the path (TGI serves its
    OpenAI routes under ``/v1`` of the same router)."""
    if not base_url or not teacher_url:
        return False
    env = os.environ if environ is None else environ
    return _server(base_url) in {_server(teacher_url)} | {_server(u) for u in _listed(env)}


def _listed(env: Mapping[str, str]) -> list[str]:
    """The replicas ``BEZOAR_TEACHER_ENDPOINTS`` lists (comma-separated base URLs)."""
    return [u.strip() for u in env.get(ENDPOINTS_ENV, "").split(",") if u.strip()]
