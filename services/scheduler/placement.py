"""Placement: queued jobs go to online nodes that have room for them, tenants in
fair share (services/scheduler/tenants.py), within their quotas.

One task places; anything that may free or add capacity (a new job, a job's end, a
node's heartbeat) wakes it. Free capacity is what a node offers minus what the jobs
the scheduler placed there reserve: the scheduler's own ledger, not the node's
estimate, so two jobs are never squeezed into the same room between heartbeats.

The queue and the ledger are kept in memory (`PlacementView`), loaded from the store
at start and then told of every job the store writes or reads: a pass costs no query
of the jobs, however many wait. The view may be behind the store (a job cancelled
by a write it has not seen yet) but never wrong for long: a dispatch is a guarded
write, so a job that moved meanwhile is read again, and the view learns from that
read. One scheduler places at a time; a second one would need the view of the first.

A pass costs what it places, not what waits: the queue is kept per tenant and per
shape (resources and kind), each shape a heap in priority-then-age order. The pass
takes the tenant with the lowest fair-share load, and from it the first job of the
shapes that fit a node now and its quota; the tenant's load grows by what it took and
it goes back among the others. A shape that no node has room for is passed over
whole, so jobs that cannot run now never hold back one that can, and a shape larger
than every node ever seen (or of a kind none runs) is never tried: `waiting_for`
says so on the job.

One module because the `Placer` works on the `PlacementView`'s per-tenant, per-shape
heaps and its ledger directly: their layout exists for `decide` and `_pick`, which take
jobs off the heaps, and `place_once`, which requeues those a dispatch did not take, so
the view and the pass change together.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable, Iterator, ValuesView
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

import structlog
from prometheus_client import Histogram

from services.scheduler.documents import JobDocument
from services.scheduler.jobs import JobService
from services.scheduler.nodes import NodeStore
from services.scheduler.store import JobStore
from services.scheduler.tenants import Quota, TenantBook
from shared.envelope import utcnow
from shared.messages.jobs import JobSpec, JobState
from shared.tasks import BackgroundLoop

log = structlog.get_logger("medhive.scheduler.placement")

#: Most dispatches decided in one pass (the next pass follows at once).
BATCH = 500
#: Dispatches in flight at once: enough to hide database and broker round trips.
DISPATCH_CONCURRENCY = 64


class Room(NamedTuple):
    cpus: float
    memory_mb: int


def requirement(job: JobDocument) -> Room:
    resources = job["spec"].get("resources") or {}
    return Room(float(resources.get("cpus", 1.0)), int(resources.get("memory_mb", 256)))


def choose_node(
    need: Room, kind: str, free: dict[str, Room], runtimes: dict[str, list[str]]
) -> str | None:
    """The fitting node with the most free memory (spreads load), or None."""
    fitting = [
        node
        for node, room in free.items()
        if room.cpus >= need.cpus and room.memory_mb >= need.memory_mb and kind in runtimes[node]
    ]
    return max(fitting, key=lambda node: (free[node].memory_mb, node), default=None)


class Shape(NamedTuple):
    """What a job needs of a node: jobs of one shape fit the same nodes."""

    need: Room
    kind: str


@dataclass(frozen=True)
class Waiting:
    """A job that waits for a node, as placement needs it."""

    job_id: str
    tenant: str
    priority: int
    shape: Shape

    @property
    def order(self) -> tuple[int, str]:
        """Highest priority first, then oldest (job ids sort by creation)."""
        return (-self.priority, self.job_id)


@dataclass(frozen=True)
class Placed:
    """A job that holds room on a node, since when, and the clocks the watchdog keeps."""

    job_id: str
    tenant: str
    attempt: int
    node_id: str
    need: Room
    since: datetime
    deadline: datetime | None
    walltime_enforced_at: datetime | None


@dataclass
class Held:
    """What one tenant's placed jobs hold."""

    cpus: float = 0.0
    memory_mb: int = 0
    jobs: int = 0
    rate: float = 0.0  # cpu-equivalents (tenants.TenantBook.rate)


def placed_since(job: JobDocument) -> datetime:
    """When the job was placed: its deadline less its walltime (both set at dispatch)."""
    walltime = job["spec"].get("walltime_s")
    if job.get("deadline") is None or walltime is None:
        return utcnow()
    return job["deadline"] - timedelta(seconds=walltime)


#: The ledger counts cpus in these units: whole numbers add and subtract exactly.
CPU_MILLIONTHS = 1_000_000


def _millionths(cpus: float) -> int:
    return round(cpus * CPU_MILLIONTHS)


class Ledger:
    """The room each placed job holds, and what each node and each tenant holds in
    all, kept as jobs come and go: a new job is checked against the nodes' free room and
    its tenant's quota at submit, and summing every placed job there cost the scheduler
    a tenth of its time under load.

    The totals count cpus in millionths, so that months of jobs added and taken away
    leave no rounding behind (a node that is empty again has exactly its room)."""

    def __init__(self) -> None:
        self._placed: dict[str, Placed] = {}
        #: node -> [jobs, millionths of cpus, memory_mb] held there
        self._nodes: dict[str, list[int]] = {}
        #: tenant -> the same, held by its jobs
        self._tenants: dict[str, list[int]] = {}

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._placed

    def __iter__(self) -> Iterator[str]:
        return iter(self._placed)

    def __len__(self) -> int:
        return len(self._placed)

    def get(self, job_id: str) -> Placed | None:
        return self._placed.get(job_id)

    def values(self) -> ValuesView[Placed]:
        return self._placed.values()

    def put(self, placed: Placed) -> None:
        """The job holds `placed` (instead of what it held before)."""
        self.pop(placed.job_id)
        self._placed[placed.job_id] = placed
        for totals, key in ((self._nodes, placed.node_id), (self._tenants, placed.tenant)):
            _count(totals, key, placed.need, 1)

    def pop(self, job_id: str) -> Placed | None:
        """The job holds nothing now; what it held."""
        placed = self._placed.pop(job_id, None)
        if placed is not None:
            for totals, key in ((self._nodes, placed.node_id), (self._tenants, placed.tenant)):
                _count(totals, key, placed.need, -1)
        return placed

    def in_use(self) -> dict[str, Room]:
        """Room held on each node by the jobs placed there."""
        return {
            node: Room(cpus / CPU_MILLIONTHS, memory_mb)
            for node, (_, cpus, memory_mb) in self._nodes.items()
        }

    def held_by(self, tenant: str) -> Held:
        """What the tenant's placed jobs hold (`rate` not counted)."""
        jobs, cpus, memory_mb = self._tenants.get(tenant, (0, 0, 0))
        return Held(cpus / CPU_MILLIONTHS, memory_mb, jobs)


def _count(totals: dict[str, list[int]], key: str, need: Room, sign: int) -> None:
    """Add (`sign` 1) or take away (-1) one job needing `need` at `key`; a key that
    holds no job is dropped."""
    counts = totals.setdefault(key, [0, 0, 0])
    counts[0] += sign
    counts[1] += sign * _millionths(need.cpus)
    counts[2] += sign * need.memory_mb
    if counts[0] == 0:
        del totals[key]


#: Told of a job whose state the view sees change: the job as stored, and the state
#: it had (None for a job new to the view).
Moved = Callable[[JobDocument, JobState | None], None]


class PlacementView:
    """The queue (jobs that wait for a node, per tenant and shape) and the ledger (room
    each placed job holds), kept from the job documents the store writes and reads.
    `released` is told of every placed job that lets go of its room, and when; each of
    `moves` of every change of a job's state (`/metrics` counts with them)."""

    def __init__(self, released: Callable[[Placed, datetime], None] | None = None) -> None:
        self.waiting: dict[str, Waiting] = {}
        self.holding = Ledger()
        #: jobs of each tenant not placed yet (queued or staging): its queued quota
        self.unplaced: dict[str, set[str]] = {}
        #: tenant -> shape -> heap of (order, job_id); an entry whose job no longer
        #: waits in that shape is skipped when it comes up
        self.queues: dict[str, dict[Shape, list[tuple[tuple[int, str], str]]]] = {}
        #: every job not ended, with its state and tenant (what `/metrics` counts)
        self.states: dict[str, tuple[JobState, str]] = {}
        self.moves: list[Moved] = []
        self._rev: dict[str, int] = {}
        self._released = released

    def observe(self, job: JobDocument) -> None:
        """Take in the job as stored (an older revision than one seen is ignored)."""
        job_id, rev = job["_id"], job.get("rev") or 0
        if rev < self._rev.get(job_id, -1):
            return
        state, tenant = JobState(job["state"]), job["tenant"]
        before = self.states.pop(job_id, None)
        if not state.terminal:
            self.states[job_id] = (state, tenant)
        was_waiting = self.waiting.pop(job_id, None)
        was_placed = self.holding.pop(job_id)
        if before is None and was_placed is not None:  # held while being stored (`hold`)
            before = (JobState.queued, tenant)  # as its history says: placed from the queue
        self._rev.pop(job_id, None)
        unplaced = self.unplaced.setdefault(tenant, set())
        if state in (JobState.queued, JobState.staging):
            unplaced.add(job_id)
        else:
            unplaced.discard(job_id)
        ready = state == JobState.queued or (
            state == JobState.staging and job.get("inputs_staged") is True
        )
        if ready:
            shape = Shape(requirement(job), job["spec"].get("kind", "container"))
            waiting = Waiting(job_id, tenant, job.get("priority", 0), shape)
            self.waiting[job_id] = waiting
            if waiting != was_waiting:
                self.requeue(waiting)
        elif state in (JobState.dispatched, JobState.running) and (node_id := job.get("node_id")):
            attempt = job.get("attempt", 0)
            same = was_placed is not None and was_placed.attempt == attempt
            since = was_placed.since if same and was_placed else placed_since(job)
            clocks = job.get("deadline"), job.get("walltime_enforced_at")
            self.holding.put(
                Placed(job_id, tenant, attempt, node_id, requirement(job), since, *clocks)
            )
        if not state.terminal:
            self._rev[job_id] = rev
        now_placed = self.holding.get(job_id)
        if (
            was_placed is not None
            and self._released is not None
            and (now_placed is None or now_placed.attempt != was_placed.attempt)
        ):
            self._released(was_placed, utcnow())
        if before is None or before[0] != state:
            for moved in self.moves:
                moved(job, before[0] if before else None)

    def hold(self, placed: Placed) -> None:
        """Count the room of a job about to be stored as placed, before the store has
        it (see `Placer.place_at_once`)."""
        self.holding.put(placed)

    def let_go(self, job_id: str) -> None:
        """Forget a `hold` unless the job was stored meanwhile (it holds its room as
        stored then)."""
        if job_id not in self._rev:
            self.holding.pop(job_id)

    def requeue(self, waiting: Waiting) -> None:
        """(Again) among its tenant's jobs of its shape."""
        shapes = self.queues.setdefault(waiting.tenant, {})
        heapq.heappush(shapes.setdefault(waiting.shape, []), (waiting.order, waiting.job_id))

    def first(self, tenant: str, shape: Shape, taken: set[str]) -> Waiting | None:
        """The tenant's first waiting job of `shape` not `taken` in this pass."""
        heap = self.queues[tenant][shape]
        while heap:
            waiting = self.waiting.get(heap[0][1])
            if waiting is not None and waiting.shape == shape and waiting.job_id not in taken:
                return waiting
            heapq.heappop(heap)  # gone, or reshaped (its new entry is elsewhere)
        del self.queues[tenant][shape]
        return None

    def held(self, rate: Callable[[float, int], float]) -> dict[str, Held]:
        """What each tenant's placed jobs hold, their cost counted by `rate`."""
        held: dict[str, Held] = {}
        for placed in self.holding.values():
            h = held.setdefault(placed.tenant, Held())
            h.cpus += placed.need.cpus
            h.memory_mb += placed.need.memory_mb
            h.jobs += 1
            h.rate += rate(*placed.need)
        return held

    def in_use(self) -> dict[str, Room]:
        """Room held on each node by the jobs placed there."""
        return self.holding.in_use()


def within(quota: Quota, held: Held, need: Room) -> bool:
    """Whether one more job needing `need` keeps the tenant within its running quota."""
    return (
        (quota.max_running_cpus is None or held.cpus + need.cpus <= quota.max_running_cpus)
        and (
            quota.max_running_memory_mb is None
            or held.memory_mb + need.memory_mb <= quota.max_running_memory_mb
        )
        and (quota.max_running_jobs is None or held.jobs + 1 <= quota.max_running_jobs)
    )


class Placer(BackgroundLoop):
    task_name = "placement"

    def __init__(
        self, store: JobStore, nodes: NodeStore, node_timeout_s: float, book: TenantBook
    ) -> None:
        super().__init__()
        self.store = store
        self.nodes = nodes
        self.node_timeout_s = node_timeout_s
        self.book = book
        self.jobs: JobService | None = None  # set by the app: the two need each other
        self.view = PlacementView(released=self._charge)
        self._started = False  # the view holds the stored jobs
        self._passing = False  # a pass is deciding or dispatching
        store.observers.append(self.view.observe)
        self._wake = asyncio.Event()
        # Added to the app's /metrics by the app (services/scheduler/metrics.py).
        self.pass_seconds = Histogram(
            "medhive_scheduler_placement_pass_seconds",
            "How long one placement pass takes: deciding, then dispatching what it placed.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=None,
        )

    def _charge(self, placed: Placed, now: datetime) -> None:
        seconds = max(0.0, (now - placed.since).total_seconds())
        self.book.charge(placed.tenant, self.book.rate(*placed.need), seconds, now)

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        for job in await self.store.placeable():
            self.view.observe(job)
        self._started = True
        await super().start()
        self.wake()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            started = time.perf_counter()
            try:
                await self.place_once()
                self.pass_seconds.observe(time.perf_counter() - started)
            except Exception:
                log.exception("placement_failed")
                await asyncio.sleep(1)  # back off from a failing database, then retry
                self.wake()

    async def free_capacity(self) -> tuple[dict[str, Room], dict[str, list[str]]]:
        fresh_after = utcnow() - timedelta(seconds=self.node_timeout_s)
        nodes = [n for n in await self.nodes.online_nodes() if n["last_seen"] > fresh_after]
        free = {n["_id"]: Room(float(n["cpus"]), int(n["memory_mb"])) for n in nodes}
        runtimes = {n["_id"]: list(n.get("runtimes", [])) for n in nodes}
        for node, used in self.view.in_use().items():
            if node in free:
                room = free[node]
                free[node] = Room(room.cpus - used.cpus, room.memory_mb - used.memory_mb)
        return free, runtimes

    def held(self) -> dict[str, Held]:
        """What each tenant's placed jobs hold, with the rate fair share counts."""
        return self.view.held(self.book.rate)

    async def place_at_once(self, job_id: str, tenant: str, spec: JobSpec) -> str | None:
        """The node a new job goes to as it is stored, its room held there (until the
        job service lets go of it, once the job is stored or not); None if it queues.

        Only when no waiting job could be placed now: then the next pass would take
        this job and no other, so placing it at once takes nothing from fair share or
        priority (jobs that cannot run now hold back none that can, as in a pass), and
        saves the job a write and a pass. The checks and the hold follow the last wait,
        so no pass can hand the same room to another job in between; while a pass
        dispatches what it chose (room the ledger counts only once those jobs are
        stored), jobs queue."""
        if not self._started:
            return None
        free, runtimes = await self.free_capacity()
        if self._passing or self._any_placeable(free, runtimes):
            return None
        need = Room(spec.resources.cpus, spec.resources.memory_mb)
        if not self._within_quota(tenant, need):
            return None
        node = choose_node(need, spec.kind, free, runtimes)
        if node is not None:
            self.view.hold(Placed(job_id, tenant, 1, node, need, utcnow(), None, None))
        return node

    def _any_placeable(self, free: dict[str, Room], runtimes: dict[str, list[str]]) -> bool:
        """Whether a waiting job fits a node and its tenant's quota now (what a pass
        would place). Costs the shapes that wait, not the jobs."""
        for tenant, shapes in list(self.view.queues.items()):
            for shape in list(shapes):
                if choose_node(shape.need, shape.kind, free, runtimes) is None:
                    continue
                if not self._within_quota(tenant, shape.need):
                    continue
                if self.view.first(tenant, shape, set()) is not None:
                    return True
        return False

    def _within_quota(self, tenant: str, need: Room) -> bool:
        """`within` the tenant's running quota."""
        quota = self.book.policy(tenant).quota
        return within(quota, self.view.holding.held_by(tenant), need)

    async def place_once(self) -> int:
        """Place what fits now, tenants in fair share; returns how many were dispatched."""
        free, runtimes = await self.free_capacity()
        if not free:
            return 0
        self._passing = True
        try:
            return await self._dispatch(self.decide(free, runtimes))
        finally:
            self._passing = False

    async def _dispatch(self, chosen: list[tuple[str, str]]) -> int:
        """Dispatch what a pass chose; how many were."""
        assert self.jobs is not None
        # Decided in order, sent concurrently: each dispatch is a guarded update, so a job
        # cancelled meanwhile just stays where it is (its room comes back next pass).
        placed = 0
        for start in range(0, len(chosen), DISPATCH_CONCURRENCY):
            batch = chosen[start : start + DISPATCH_CONCURRENCY]
            results = await asyncio.gather(*(self.jobs.dispatch(j, n) for j, n in batch))
            placed += sum(results)
            for (job_id, node), ok in zip(batch, results, strict=True):
                if ok:
                    log.debug("job_placed", job_id=job_id, node_id=node)
                elif (still := self.view.waiting.get(job_id)) is not None:
                    self.view.requeue(still)  # taken off its heap above; it waits on
        if len(chosen) == BATCH and placed:
            self.wake()
        return placed

    def decide(
        self, free: dict[str, Room], runtimes: dict[str, list[str]]
    ) -> list[tuple[str, str]]:
        """(job, node) for up to BATCH jobs, in the order fair share takes them; `free`
        is used up as they are decided. Costs what it places, not what waits."""
        now = utcnow()
        held = self.held()
        for tenant in [t for t, shapes in self.view.queues.items() if not shapes]:
            del self.view.queues[tenant]
        turns = [(self.book.load_of(t, held.get(t, Held()).rate, now), t) for t in self.view.queues]
        heapq.heapify(turns)
        chosen: list[tuple[str, str]] = []
        taken: set[str] = set()
        while turns and len(chosen) < BATCH:
            _, tenant = heapq.heappop(turns)
            holds = held.setdefault(tenant, Held())
            pick = self._pick(tenant, holds, free, runtimes, taken)
            if pick is None:
                continue  # nothing of this tenant fits now: the others go on
            waiting, node = pick
            need = waiting.shape.need
            room = free[node]
            free[node] = Room(room.cpus - need.cpus, room.memory_mb - need.memory_mb)
            holds.cpus, holds.memory_mb = holds.cpus + need.cpus, holds.memory_mb + need.memory_mb
            holds.jobs += 1
            holds.rate += self.book.rate(*need)
            taken.add(waiting.job_id)
            chosen.append((waiting.job_id, node))
            heapq.heappush(turns, (self.book.load_of(tenant, holds.rate, now), tenant))
        return chosen

    def _pick(
        self,
        tenant: str,
        holds: Held,
        free: dict[str, Room],
        runtimes: dict[str, list[str]],
        taken: set[str],
    ) -> tuple[Waiting, str] | None:
        """The tenant's first job, by priority then age, among the shapes that fit a
        node now and its quota; and the node."""
        quota = self.book.policy(tenant).quota
        best: tuple[Waiting, str] | None = None
        for shape in list(self.view.queues.get(tenant, {})):
            if not within(quota, holds, shape.need):
                continue
            node = choose_node(shape.need, shape.kind, free, runtimes)
            if node is None:
                continue
            waiting = self.view.first(tenant, shape, taken)
            if waiting is not None and (best is None or waiting.order < best[0].order):
                best = (waiting, node)
        return best

    async def waiting_for(self, job_id: str) -> str | None:
        """Why a job that waits for a node is not placed yet (None if it does not wait)."""
        waiting = self.view.waiting.get(job_id)
        if waiting is None:
            return None
        need, kind = waiting.shape
        wants = f"{need.cpus:g} cpus and {need.memory_mb} MiB ({kind})"
        nodes = await self.nodes.all_nodes()
        if not any(
            kind in n.get("runtimes", []) and n["cpus"] >= need.cpus
            and n["memory_mb"] >= need.memory_mb
            for n in nodes
        ):  # fmt: skip
            return f"no node seen so far could ever run it: it needs {wants}"
        quota = self.book.policy(waiting.tenant).quota
        if not within(quota, self.view.holding.held_by(waiting.tenant), need):
            return f"its tenant's running quota is reached ({_quota_text(quota)})"
        free, runtimes = await self.free_capacity()
        if choose_node(need, kind, free, runtimes) is None:
            return f"no online node has room for it now: it needs {wants}"
        return (
            "its turn: tenants take turns by fair share, and within its tenant jobs go by "
            "priority, then age"
        )


def _quota_text(quota: Quota) -> str:
    limits = {"cpus": quota.max_running_cpus, "MiB": quota.max_running_memory_mb,
              "jobs": quota.max_running_jobs}  # fmt: skip
    return ", ".join(f"at most {v:g} {k}" for k, v in limits.items() if v is not None)
