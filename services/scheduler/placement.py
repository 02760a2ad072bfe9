"""Placement: queued jobs go to online nodes that have room for them.

One task places; anything that may free or add capacity (a new job, a job's end, a
node's heartbeat) wakes it. Free capacity is what a node offers minus what the jobs
the scheduler placed there reserve: the scheduler's own ledger, not the node's
estimate, so two jobs are never squeezed into the same room between heartbeats.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import NamedTuple

import structlog

from services.scheduler.jobs import JobService
from services.scheduler.store import JobStore
from shared.envelope import utcnow
from shared.mongo import Document
from shared.tasks import BackgroundLoop

log = structlog.get_logger("medhive.scheduler.placement")

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


class Placer(BackgroundLoop):
    task_name = "placement"

    def __init__(self, store: JobStore, node_timeout_s: float) -> None:
        super().__init__()
        self.store = store
        self.node_timeout_s = node_timeout_s
        self.jobs: JobService | None = None  # set by the app: the two need each other
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
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
        for job in await self.store.placed():
            node = job.get("node_id")
            if node in free:
                need = requirement(job)
                room = free[node]
                free[node] = Room(room.cpus - need.cpus, room.memory_mb - need.memory_mb)
        return free, runtimes

    async def place_once(self) -> int:
        """Place what fits now; returns how many jobs were dispatched."""
        assert self.jobs is not None
        free, runtimes = await self.free_capacity()
        if not free:
            return 0
        queued = await self.store.queued(BATCH)
        chosen: list[tuple[Document, str]] = []
        for job in queued:
            need = requirement(job)
            node = choose_node(need, job["spec"].get("kind", "container"), free, runtimes)
            if node is None:
                continue  # a smaller job further down may still fit
            room = free[node]
            free[node] = Room(room.cpus - need.cpus, room.memory_mb - need.memory_mb)
            chosen.append((job, node))
        # Decided in order, sent concurrently: each dispatch is a guarded update, so a job
        # cancelled meanwhile just stays where it is (its room comes back next pass).
        placed = 0
        for start in range(0, len(chosen), DISPATCH_CONCURRENCY):
            batch = chosen[start : start + DISPATCH_CONCURRENCY]
            results = await asyncio.gather(*(self.jobs.dispatch(j, n) for j, n in batch))
            placed += sum(results)
            for (job, node), ok in zip(batch, results, strict=True):
                if ok:
                    log.info("job_placed", job_id=job["_id"], node_id=node)
        if len(queued) == BATCH and placed:
            self.wake()
        return placed
