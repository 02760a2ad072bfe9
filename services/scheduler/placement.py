"""Placement: queued jobs go to online nodes that have room for them.

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
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

import structlog

from services.scheduler.jobs import JobService
from services.scheduler.store import JobStore
from shared.envelope import utcnow
from shared.messages.jobs import JobState
from shared.mongo import Document
from shared.tasks import BackgroundLoop

log = structlog.get_logger("medhive.scheduler.placement")

#: Most dispatches decided in one pass (the next pass follows at once).
BATCH = 500
#: Dispatches in flight at once: enough to hide database and broker round trips.
DISPATCH_CONCURRENCY = 64


class Room(NamedTuple):
    cpus: float
    memory_mb: int


def requirement(job: Document) -> Room:
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


@dataclass(frozen=True)
class Waiting:
    """A job that waits for a node, as placement needs it."""

    job_id: str
    priority: int
    need: Room
    kind: str

    @property
    def order(self) -> tuple[int, str]:
        """Highest priority first, then oldest (job ids sort by creation)."""
        return (-self.priority, self.job_id)


@dataclass(frozen=True)
class Placed:
    """A job that holds room on a node, with the clocks the watchdog keeps."""

    job_id: str
    node_id: str
    need: Room
    deadline: datetime | None
    walltime_enforced_at: datetime | None


class PlacementView:
    """The queue (jobs that wait for a node) and the ledger (room each placed job
    holds), kept from the job documents the store writes and reads."""

    def __init__(self) -> None:
        self.waiting: dict[str, Waiting] = {}
        self.holding: dict[str, Placed] = {}
        self._rev: dict[str, int] = {}

    def observe(self, job: Document) -> None:
        """Take in the job as stored (an older revision than one seen is ignored)."""
        job_id, rev = job["_id"], job.get("rev") or 0
        if rev < self._rev.get(job_id, -1):
            return
        state = JobState(job["state"])
        self.waiting.pop(job_id, None)
        self.holding.pop(job_id, None)
        self._rev.pop(job_id, None)
        ready = state == JobState.queued or (
            state == JobState.staging and job.get("inputs_staged") is True
        )
        if ready:
            kind = job["spec"].get("kind", "container")
            self.waiting[job_id] = Waiting(job_id, job.get("priority", 0), requirement(job), kind)
        elif state in (JobState.dispatched, JobState.running) and job.get("node_id"):
            clocks = job.get("deadline"), job.get("walltime_enforced_at")
            self.holding[job_id] = Placed(job_id, job["node_id"], requirement(job), *clocks)
        if not state.terminal:
            self._rev[job_id] = rev

    def queue(self) -> list[Waiting]:
        return sorted(self.waiting.values(), key=lambda w: w.order)

    def in_use(self) -> dict[str, Room]:
        """Room held on each node by the jobs placed there."""
        used: dict[str, Room] = {}
        for placed in self.holding.values():
            room = used.get(placed.node_id, Room(0.0, 0))
            need = placed.need
            used[placed.node_id] = Room(room.cpus + need.cpus, room.memory_mb + need.memory_mb)
        return used


class Placer(BackgroundLoop):
    task_name = "placement"

    def __init__(self, store: JobStore, node_timeout_s: float) -> None:
        super().__init__()
        self.store = store
        self.node_timeout_s = node_timeout_s
        self.jobs: JobService | None = None  # set by the app: the two need each other
        self.view = PlacementView()
        store.observers.append(self.view.observe)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        for job in await self.store.placeable():
            self.view.observe(job)
        await super().start()
        self.wake()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.place_once()
            except Exception:
                log.exception("placement_failed")
                await asyncio.sleep(1)  # back off from a failing database, then retry
                self.wake()

    async def free_capacity(self) -> tuple[dict[str, Room], dict[str, list[str]]]:
        fresh_after = utcnow() - timedelta(seconds=self.node_timeout_s)
        nodes = [n for n in await self.store.online_nodes() if n["last_seen"] > fresh_after]
        free = {n["_id"]: Room(float(n["cpus"]), int(n["memory_mb"])) for n in nodes}
        runtimes = {n["_id"]: list(n.get("runtimes", [])) for n in nodes}
        for node, used in self.view.in_use().items():
            if node in free:
                room = free[node]
                free[node] = Room(room.cpus - used.cpus, room.memory_mb - used.memory_mb)
        return free, runtimes

    async def place_once(self) -> int:
        """Place what fits now; returns how many jobs were dispatched."""
        assert self.jobs is not None
        free, runtimes = await self.free_capacity()
        if not free:
            return 0
        chosen: list[tuple[str, str]] = []
        for waiting in self.view.queue():
            node = choose_node(waiting.need, waiting.kind, free, runtimes)
            if node is None:
                continue  # a smaller job further down may still fit
            room = free[node]
            need = waiting.need
            free[node] = Room(room.cpus - need.cpus, room.memory_mb - need.memory_mb)
            chosen.append((waiting.job_id, node))
            if len(chosen) == BATCH:
                break
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
        if len(chosen) == BATCH and placed:
            self.wake()
        return placed
