"""Publishes what job updates left in their outbox, then removes it.

A state change and the messages that announce it are stored in one update; this relay
publishes them with confirms and only then drops them from the outbox. It runs right
after each change; what could not be published then (the broker away, a node's queue
not there yet) is tried again every `sweep_s`; and a sweep of the whole store, at start
and now and then, finds what a scheduler killed between storing and publishing left.
So everything is published at least once (consumers de-duplicate by message id).

Dropping costs a write, so it is mostly free: a job's next write replaces its outbox
with what is not published yet (store.py), which drops the rest on the way. Only what
the last write of a job added, or what waits longer than `IDLE_DROP_S` for the next
one, is dropped here: published entries wait in memory, and one group of writes
removes those of many jobs at once. The sweep passes over entries already published;
a scheduler killed before the drop publishes them again at its next start, which is
the at-least-once above.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable

import structlog
from pymongo.errors import PyMongoError

from services.scheduler.documents import JobOutbox, OutboxEntry
from services.scheduler.store import DROP_CHUNK, JobStore
from shared.bus import Bus, Unroutable
from shared.envelope import Envelope
from shared.tasks import PeriodicLoop

log = structlog.get_logger("medhive.scheduler.outbox")

#: Published entries of a job that is not over are dropped after this long without a
#: write of the job that would drop them anyway.
IDLE_DROP_S = 30.0
#: How often the drop runs, unless `DROP_CHUNK` ended jobs ask sooner: the entries of
#: the jobs that ended meanwhile go in one statement, not one each (at a few jobs a
#: second that was a statement per job; published entries harm no one by waiting).
DROP_EVERY_S = 0.5
#: How old an outbox write must be before the periodic sweep of the whole store looks
#: at it: by then what was published is dropped, so the sweep finds only what no one
#: published (a writer that failed without saying so).
SWEEP_SETTLED_S = 2 * IDLE_DROP_S
#: How long a publish right after a change retries before it leaves the rest to the
#: sweep (a broker node lost in a cluster is replaced within a second or two).
PROMPT_DEADLINE_S = 3.0
#: How long the sweep's publishes retry.
SWEEP_DEADLINE_S = 60.0
#: Sweeps of the whole store, one per this many periods (`sweep_s`); in between, only
#: the jobs whose publishing failed here are tried again.
FULL_SWEEP_EVERY = 12


class OutboxRelay(PeriodicLoop):
    task_name = "outbox-sweep"

    def __init__(self, store: JobStore, bus: Bus, sweep_s: float = 5.0) -> None:
        super().__init__(sweep_s)  # a periodic safety net: retries and full sweeps
        self.store = store
        self.bus = bus
        self._periods = 0
        #: Job id -> ids of its outbox entries that are published but not dropped yet.
        self._published: dict[str, set[str]] = {}
        #: Job id -> when its oldest entry not dropped yet was published (monotonic).
        self._since: dict[str, float] = {}
        #: Jobs whose last write is stored and published: their entries go at once.
        self._finished: set[str] = set()
        #: Jobs with entries that could not be published: tried again every `sweep_s`.
        self._stuck: set[str] = set()
        self._drop_wanted = asyncio.Event()
        self._dropper: asyncio.Task[None] | None = None

    def published(self, job_id: str) -> set[str]:
        """Ids of the job's entries that are published and not dropped yet."""
        return set(self._published.get(job_id, ()))

    def forget(self, job_id: str, ids: set[str]) -> None:
        """These entries are gone from the outbox (a write replaced it)."""
        if ids and (left := self._published.get(job_id, set()) - ids):
            self._published[job_id] = left
        elif ids:
            self._published.pop(job_id, None)
            self._since.pop(job_id, None)

    async def flush(self, job_id: str, entries: Iterable[OutboxEntry], final: bool = False) -> None:
        """Publish `entries` of one job right after the change that stored them (`final`:
        the job will not be written again).

        The change is stored whatever happens here, so its caller goes on: an HTTP
        client is told its job is submitted, a node's report is acknowledged. If the
        broker is away longer than `PROMPT_DEADLINE_S`, the entries wait for the retry
        every `sweep_s` instead of holding the caller."""
        try:
            await self._publish(job_id, entries, PROMPT_DEADLINE_S, final)
        except Exception as exc:  # the broker is away: _publish marked the job stuck
            log.warning("outbox_deferred", job_id=job_id, error=repr(exc)[:300])

    async def _publish(
        self, job_id: str, entries: Iterable[OutboxEntry], deadline_s: float, final: bool
    ) -> None:
        """Publish `entries` of one job in order; they are dropped from its outbox by
        its next write, or here (at the next drop if `final`: the job will not be
        written; the drop comes sooner once a whole statement's worth of jobs waits)."""
        ids = []
        for entry in entries:
            body = entry.get("body")
            if body is not None:
                envelope = Envelope.model_validate_json(body)
            else:  # stored by an older version
                envelope = Envelope.model_validate(entry["envelope"])
            try:
                await self.bus.publish(
                    envelope, node_id=entry.get("node"), body=body, deadline_s=deadline_s
                )
            except Unroutable as exc:
                # The node's queue is not there (yet): keep this and what follows, in
                # order, to be tried again. The state change itself is already stored.
                log.warning("outbox_unroutable", job_id=job_id, error=str(exc))
                self._stuck.add(job_id)
                break
            except BaseException:
                self._stuck.add(job_id)  # the broker is away: tried again by the sweep
                raise
            ids.append(entry["id"])
        if ids:
            self._published.setdefault(job_id, set()).update(ids)
            self._since.setdefault(job_id, time.monotonic())
        if final:
            self._finished.add(job_id)
            if len(self._finished) >= DROP_CHUNK:
                self._drop_wanted.set()

    async def sweep(self, settled_s: float = SWEEP_SETTLED_S) -> int:
        """Publish every outbox entry not published yet (of writes at least `settled_s`
        old); returns how many jobs it did."""
        return await self._republish(await self.store.with_outbox(settled_s))

    async def retry_stuck(self) -> int:
        """Publish again what could not be published here; returns how many jobs."""
        stuck, self._stuck = self._stuck, set()
        try:
            return await self._republish(await self.store.outboxes(stuck)) if stuck else 0
        except BaseException:
            self._stuck |= stuck  # the broker is away: all of them at the next tick
            raise

    async def _republish(self, jobs: list[JobOutbox]) -> int:
        done = 0
        for job in jobs:
            if not job["outbox"]:  # emptied by a drop that could not unmark it
                await self.store.clear_outbox_mark(job["_id"])
                continue
            published = self._published.get(job["_id"], set())
            if entries := [e for e in job["outbox"] if e["id"] not in published]:
                # Old entries: dropped soon. The broker away ends the whole sweep.
                await self._publish(job["_id"], entries, SWEEP_DEADLINE_S, final=True)
                done += 1
        return done

    async def drop_published(self, everything: bool = False) -> None:
        """Remove from the outboxes what is published and will not be dropped by a
        later write (every published entry if `everything`), in one group of writes."""
        idle_since = time.monotonic() - IDLE_DROP_S
        batch = {
            job_id: set(ids)
            for job_id, ids in self._published.items()
            if everything or job_id in self._finished or self._since[job_id] <= idle_since
        }
        if not batch:
            return
        await self.store.drop_outboxes(batch)
        for job_id, ids in batch.items():  # entries published meanwhile stay for the next
            self.forget(job_id, ids)
            if job_id not in self._published:
                self._finished.discard(job_id)

    async def _drop_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # the idle ones are due now and then
                async with asyncio.timeout(DROP_EVERY_S):
                    await self._drop_wanted.wait()
            self._drop_wanted.clear()
            try:
                await self.drop_published()
            except PyMongoError as exc:
                log.warning("outbox_drop_failed", error=repr(exc)[:300], retry_in_s=1)
                await asyncio.sleep(1)  # the database is away: try again shortly

    async def start(self) -> None:
        await self.sweep(settled_s=0)
        await self.drop_published(everything=True)
        self._dropper = asyncio.create_task(self._drop_loop(), name="outbox-drop")
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        if self._dropper is not None:
            self._dropper.cancel()
            await asyncio.gather(self._dropper, return_exceptions=True)
            self._dropper = None
        with contextlib.suppress(PyMongoError):  # what stays is published again at start
            await self.drop_published(everything=True)

    async def tick(self) -> None:
        self._periods += 1
        done = await self.retry_stuck()
        if self._periods % FULL_SWEEP_EVERY == 0:
            done += await self.sweep()
        if done:
            log.info("outbox_swept", jobs=done)
