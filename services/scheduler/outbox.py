"""Publishes what job updates left in their outbox, then removes it.

A state change and the messages that announce it are stored in one update; this relay
publishes them with confirms and only then drops them from the outbox. It runs right
after each change and, as a sweep, at start and periodically, so a scheduler killed
between storing and publishing still publishes everything (at least once; consumers
de-duplicate by message id).

Dropping is batched: published entries wait in memory, and one bulk write removes
those of every job at once, while the next batch gathers behind it. A document update
is the store's dearest operation, and one per change would double the writes of every
job. The sweep passes over entries already published; a scheduler killed before the
drop publishes them again at its next start, which is the at-least-once above.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

import structlog
from pymongo.errors import PyMongoError

from services.scheduler.store import JobStore
from shared.bus import Bus, Unroutable
from shared.envelope import Envelope
from shared.mongo import Document
from shared.tasks import BackgroundLoop

log = structlog.get_logger("medhive.scheduler.outbox")


class OutboxRelay(BackgroundLoop):
    task_name = "outbox-sweep"

    def __init__(self, store: JobStore, bus: Bus, sweep_s: float = 5.0) -> None:
        super().__init__()
        self.store = store
        self.bus = bus
        self.sweep_s = sweep_s
        #: Job id -> ids of its outbox entries that are published but not dropped yet.
        self._published: dict[str, set[str]] = {}
        self._drop_wanted = asyncio.Event()
        self._dropper: asyncio.Task[None] | None = None

    async def flush(self, job_id: str, entries: Iterable[Document]) -> None:
        """Publish `entries` of one job in order, then drop them from its outbox."""
        ids = []
        for entry in entries:
            envelope = Envelope.model_validate(entry["envelope"])
            try:
                await self.bus.publish(envelope, node_id=entry.get("node"))
            except Unroutable as exc:
                # The node's queue is not there (yet): keep this and what follows, in
                # order, for the sweep. The state change itself is already stored.
                log.warning("outbox_unroutable", job_id=job_id, error=str(exc))
                break
            ids.append(entry["id"])
        if ids:
            self._published.setdefault(job_id, set()).update(ids)
            self._drop_wanted.set()

    async def sweep(self) -> int:
        """Publish every outbox entry not published yet; returns how many jobs it did."""
        done = 0
        for job in await self.store.with_outbox():
            published = self._published.get(job["_id"], set())
            if entries := [e for e in job["outbox"] if e["id"] not in published]:
                await self.flush(job["_id"], entries)
                done += 1
        return done

    async def drop_published(self) -> None:
        """Remove what is published from the outboxes, in one bulk write."""
        batch = {job_id: set(ids) for job_id, ids in self._published.items()}
        if not batch:
            return
        await self.store.drop_outboxes(batch)
        for job_id, ids in batch.items():  # entries published meanwhile stay for the next
            if left := self._published.get(job_id, set()) - ids:
                self._published[job_id] = left
            else:
                self._published.pop(job_id, None)

    async def _drop_loop(self) -> None:
        while True:
            await self._drop_wanted.wait()
            self._drop_wanted.clear()
            try:
                await self.drop_published()
            except PyMongoError as exc:
                log.warning("outbox_drop_failed", error=repr(exc)[:300], retry_in_s=1)
                self._drop_wanted.set()
                await asyncio.sleep(1)  # the database is away: try again shortly

    async def start(self) -> None:
        await self.sweep()
        await self.drop_published()
        self._dropper = asyncio.create_task(self._drop_loop(), name="outbox-drop")
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        if self._dropper is not None:
            self._dropper.cancel()
            await asyncio.gather(self._dropper, return_exceptions=True)
            self._dropper = None
        with contextlib.suppress(PyMongoError):  # what stays is published again at start
            await self.drop_published()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)  # a periodic safety net, not a wait for an event
            try:
                if done := await self.sweep():
                    log.info("outbox_swept", jobs=done)
            except Exception:
                log.exception("outbox_sweep_failed")
