"""Publishes what job updates left in their outbox, then removes it.

A state change and the messages that announce it are stored in one update; this relay
publishes them with confirms and only then drops them from the outbox. It runs right
after each change and, as a sweep, at start and periodically, so a scheduler killed
between storing and publishing still publishes everything (at least once; consumers
de-duplicate by message id).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import structlog

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
            await self.store.drop_outbox(job_id, ids)

    async def sweep(self) -> int:
        """Publish every outbox still holding messages; returns how many jobs it did."""
        jobs = await self.store.with_outbox()
        for job in jobs:
            await self.flush(job["_id"], job["outbox"])
        return len(jobs)

    async def start(self) -> None:
        await self.sweep()
        await super().start()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)  # a periodic safety net, not a wait for an event
            try:
                if done := await self.sweep():
                    log.info("outbox_swept", jobs=done)
            except Exception:
                log.exception("outbox_sweep_failed")
