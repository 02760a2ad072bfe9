"""The scheduler's collections: jobs (with history and outbox), nodes, and job output.

Every write of a job goes through `JobStore.apply`: a single-document update that sets
the job's fields, appends its history entries and puts the messages announcing the
change in its outbox, all at once. A crash after the update loses nothing: the relay
publishes whatever an outbox still holds (see outbox.py).

Each write is guarded by the job's revision (`rev`, one more with every write): it
stores only if the job is still what the writer decided on, so a concurrent change
makes the writer read again and decide again, never overwrite. Because of that guard
the store can keep the jobs it wrote lately in memory (`recent`) and decide on them
without reading them back: a copy that is stale (another writer changed the job) fails
its guard and is read again. The same write replaces the outbox with the entries not
yet published plus the new ones, which drops what was published at no extra cost.
Writes are sent in groups (commit.py).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase

from services.scheduler.commit import GroupCommit
from shared.envelope import Envelope, utcnow
from shared.messages.jobs import JobSpec, JobState
from shared.mongo import Document

S = JobState
#: The state machine, in one place: which states each state may move to.
ALLOWED: dict[JobState, frozenset[JobState]] = {
    S.submitted: frozenset({S.queued, S.cancelled, S.failed}),
    S.queued: frozenset({S.staging, S.dispatched, S.cancelled, S.failed}),
    S.staging: frozenset({S.dispatched, S.cancelled, S.failed}),
    S.dispatched: frozenset({S.running, S.succeeded, S.failed, S.timed_out, S.cancelled, S.lost}),
    S.running: frozenset({S.succeeded, S.failed, S.timed_out, S.cancelled, S.lost}),
    S.lost: frozenset({S.queued, S.failed, S.cancelled}),
    S.succeeded: frozenset(),
    S.failed: frozenset(),
    S.timed_out: frozenset(),
    S.cancelled: frozenset(),
}


#: Jobs kept in memory after the scheduler wrote or read them, least recent dropped first.
RECENT_JOBS = 10_000
#: Fields of a job document that only the store uses.
INTERNAL_FIELDS = frozenset({"_id", "outbox", "outbox_at", "rev", "w"})


class IdempotencyConflict(Exception):
    """The same idempotency key, or the same message id from the same sender, was used
    for a different job description."""


@dataclass(frozen=True)
class Submission:
    """What a submit command found: the job it made, or the one it repeats."""

    job: Document
    created: bool
    #: For a repeat, what matched: "message_id" or "idempotency_key".
    matched_by: str | None = None


@dataclass(frozen=True)
class Change:
    """What one write does to a job: fields it sets (dotted paths allowed), entries it
    appends to the history, and messages it adds to the outbox."""

    fields: Document
    history: list[Document]
    outbox: list[Document]


def outbox_entry(envelope: Envelope, node_id: str | None = None) -> Document:
    """An outbox item: the message and, for node commands, the node it goes to."""
    return {"id": str(envelope.id), "envelope": envelope.model_dump(mode="json"), "node": node_id}


def with_fields(doc: Document, fields: Document) -> Document:
    """A copy of `doc` with `fields` set as `$set` sets them (dotted paths too)."""
    out = dict(doc)
    for key, value in fields.items():
        head, _, rest = key.partition(".")
        out[head] = with_fields(out.get(head) or {}, {rest: value}) if rest else value
    return out


class JobStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.jobs = db["jobs"]
        self.nodes = db["nodes"]
        self.output = db["output"]
        self.commit = GroupCommit(self.jobs)
        #: Whole job documents as last written or read here, outbox included.
        self.recent: OrderedDict[str, Document] = OrderedDict()
        #: Told of every job document this store writes or reads whole (placement
        #: keeps its view of the queue and of the capacity in use this way).
        self.observers: list[Callable[[Document], None]] = []

    async def create_indexes(self) -> None:
        await self.jobs.create_index(
            [("tenant", ASCENDING), ("idempotency_key", ASCENDING)],
            unique=True,
            partialFilterExpression={"idempotency_key": {"$type": "string"}},
        )
        # One job per command: a command is acted on once per sender and message id,
        # whichever scheduler instance or redelivery sees it first.
        await self.jobs.create_index(
            [("command.sender", ASCENDING), ("command.id", ASCENDING)],
            unique=True,
            partialFilterExpression={"command.sender": {"$type": "string"}},
        )
        await self.jobs.create_index([("state", ASCENDING), ("priority", DESCENDING)])
        await self.jobs.create_index([("tenant", ASCENDING), ("_id", DESCENDING)])
        await self.jobs.create_index(
            [("tenant", ASCENDING), ("state", ASCENDING), ("_id", DESCENDING)]
        )
        # Only jobs with messages to publish carry `outbox_at`: the relay's sweep finds
        # them through this index. A scalar key: an index on the outbox itself would
        # be rewritten with every message.
        await self.jobs.create_index([("outbox_at", ASCENDING)], sparse=True)
        if "outbox.0_1" in await self.jobs.index_information():  # stores of older versions
            await self.jobs.update_many(
                {"outbox.0": {"$exists": True}}, {"$set": {"outbox_at": utcnow()}}
            )
            await self.jobs.drop_index("outbox.0_1")
        await self.output.create_index(
            [("job_id", ASCENDING), ("attempt", ASCENDING), ("stream", ASCENDING)], unique=True
        )

    # -- jobs ---------------------------------------------------------------------

    async def insert_job(
        self,
        job_id: str,
        tenant: str,
        actor: str | None,
        spec: JobSpec,
        command: Document,
        history: list[Document],
        outbox: list[Document],
    ) -> Submission:
        """Store a new job, or find the one this submission repeats.

        `command` is `{"id", "sender"}`: the id of the message (or HTTP request) that
        asked, and who sent it. A repeat is the same command id from the same sender,
        or the same idempotency key in the tenant; with another description it is a
        conflict, not a repeat.
        """
        now = utcnow()
        doc: Document = {
            "_id": job_id,
            "tenant": tenant,
            "actor": actor,
            "name": spec.name,
            "spec": spec.model_dump(mode="json"),
            "priority": spec.priority,
            "state": history[-1]["state"],
            "history": history,
            "attempt": 0,
            "node_id": None,
            "command": command,
            "created_at": now,
            "updated_at": now,
            "outbox": outbox,
            "rev": 0,
        }
        if outbox:
            doc["outbox_at"] = now
        if spec.idempotency_key is not None:
            doc["idempotency_key"] = spec.idempotency_key
        if await self.commit.insert(doc):
            self._remember(doc)
            return Submission(doc, True)
        for matched_by, query in (
            ("message_id", {"command.sender": command["sender"], "command.id": command["id"]}),
            ("idempotency_key", {"tenant": tenant, "idempotency_key": spec.idempotency_key}),
        ):
            if matched_by == "idempotency_key" and spec.idempotency_key is None:
                continue
            existing = await self.jobs.find_one(query, {"outbox": 0})
            if existing is not None:
                if existing["spec"] != doc["spec"] or existing["tenant"] != tenant:
                    raise IdempotencyConflict(existing["_id"], matched_by)
                return Submission(existing, False, matched_by)
        raise RuntimeError(f"job {job_id} clashed with a job that cannot be found")

    async def get(self, job_id: str, tenant: str | None = None) -> Document | None:
        query: Document = {"_id": job_id}
        if tenant is not None:
            query["tenant"] = tenant
        return await self.jobs.find_one(query, {"outbox": 0})

    async def page(
        self, tenant: str, state: str | None, before: str | None, limit: int
    ) -> list[Document]:
        query: Document = {"tenant": tenant}
        if state is not None:
            query["state"] = state
        if before is not None:
            query["_id"] = {"$lt": before}
        cursor = self.jobs.find(query, {"outbox": 0, "history": 0}).sort("_id", DESCENDING)
        return await cursor.limit(limit).to_list()

    # -- writing jobs ---------------------------------------------------------------

    def _remember(self, job: Document) -> None:
        for observe in self.observers:
            observe(job)
        self.recent[job["_id"]] = job
        self.recent.move_to_end(job["_id"])
        if len(self.recent) > RECENT_JOBS:
            self.recent.popitem(last=False)

    async def current(
        self, job_id: str, *, fresh: bool = False, seen: Document | None = None
    ) -> Document | None:
        """The job to decide on: the copy in memory unless `fresh`; else `seen` (a
        document the caller just read, possibly without history and outbox); else a
        read. Whichever it is, the write's guard finds out if it is stale."""
        if not fresh:
            known = self.recent.get(job_id)
            if known is not None and (seen is None or known.get("rev") == seen.get("rev")):
                self.recent.move_to_end(job_id)
                return known
            if seen is not None:
                return seen
        job = await self.jobs.find_one({"_id": job_id})
        if job is not None:
            self._remember(job)
        else:
            self.recent.pop(job_id, None)
        return job

    async def apply(self, job: Document, change: Change, published: set[str]) -> Document | None:
        """Store `change` if the job is still at the revision `job` has; returns the
        job as written, or None when it changed meanwhile (read it again).

        When `job` has its outbox, the outbox is replaced by its entries not in
        `published` plus the new ones; otherwise the new ones are appended.
        """
        now = utcnow()
        rev = job.get("rev")
        fields: Document = {**change.fields, "updated_at": now, "rev": (rev or 0) + 1}
        update: Document = {"$set": fields}
        push: Document = {}
        if change.history:
            push["history"] = {"$each": change.history}
        if "outbox" in job:
            fields["outbox"] = [e for e in job["outbox"] if e["id"] not in published]
            fields["outbox"] += change.outbox
            if fields["outbox"]:
                fields["outbox_at"] = now
            else:
                update["$unset"] = {"outbox_at": ""}
        elif change.outbox:
            push["outbox"] = {"$each": change.outbox}
            fields["outbox_at"] = now
        if push:
            update["$push"] = push
        if not await self.commit.update(job["_id"], {"rev": rev}, update):
            self.recent.pop(job["_id"], None)
            return None
        written = with_fields(job, fields)
        if "history" in job:
            written["history"] = [*job["history"], *change.history]
        if "history" in job and "outbox" in job:
            self._remember(written)
        else:
            self.recent.pop(job["_id"], None)
            for observe in self.observers:
                observe(written)
        return written

    async def drop_outboxes(self, published: dict[str, set[str]]) -> None:
        """Remove published entries from the outboxes of many jobs (job id -> entry
        ids), in one group of writes. A job whose whole outbox is published (as far as
        the copy in memory knows) gets an empty one, guarded by its revision; if it
        changed meanwhile, that change dropped them already. Others get a `$pull`."""

        async def drop(job_id: str, ids: set[str]) -> None:
            known = self.recent.get(job_id)
            if known is not None and {e["id"] for e in known["outbox"]} <= ids:
                guard: Document = {"rev": known.get("rev")}
                update: Document = {"$set": {"outbox": []}, "$unset": {"outbox_at": ""}}
            else:
                guard, update = {}, {"$pull": {"outbox": {"id": {"$in": sorted(ids)}}}}
            await self.commit.update(job_id, guard, update, tracked=False)
            if "$pull" in update:
                await self.clear_outbox_mark(job_id)
            if (known := self.recent.get(job_id)) is not None:
                outbox = [e for e in known["outbox"] if e["id"] not in ids]
                self.recent[job_id] = {**known, "outbox": outbox}

        await asyncio.gather(*(drop(job_id, ids) for job_id, ids in published.items()))

    async def clear_outbox_mark(self, job_id: str) -> None:
        """Unmark the job if its outbox is empty (after a `$pull`): the sweep looks no
        further."""
        guard = {"outbox": {"$size": 0}}
        await self.commit.update(job_id, guard, {"$unset": {"outbox_at": ""}}, tracked=False)

    async def placeable(self) -> list[Document]:
        """Jobs waiting for a node or holding room on one (queued; staging; dispatched;
        running), without history and outbox: what placement starts from."""
        states = [JobState.queued, JobState.staging, JobState.dispatched, JobState.running]
        query = {"state": {"$in": [state.value for state in states]}}
        return await self.jobs.find(query, {"outbox": 0, "history": 0}).to_list()

    async def outboxes(self, job_ids: set[str]) -> list[Document]:
        """The outboxes of these jobs."""
        cursor = self.jobs.find({"_id": {"$in": sorted(job_ids)}}, {"outbox": 1})
        return await cursor.to_list()

    async def with_outbox(self, settled_s: float = 0.0, limit: int = 500) -> list[Document]:
        """Jobs whose outbox was last written at least `settled_s` ago and may still
        hold messages (the writer itself publishes what is newer)."""
        before = utcnow() - timedelta(seconds=settled_s)
        cursor = self.jobs.find({"outbox_at": {"$lte": before}}, {"outbox": 1})
        return await cursor.limit(limit).to_list()

    # -- nodes --------------------------------------------------------------------

    async def node_seen(self, node_id: str, status: Document, online: bool) -> None:
        await self.nodes.update_one(
            {"_id": node_id},
            {"$set": {**status, "online": online, "last_seen": utcnow()}},
            upsert=True,
        )

    async def online_nodes(self) -> list[Document]:
        return await self.nodes.find({"online": True}).to_list()

    async def all_nodes(self) -> list[Document]:
        return await self.nodes.find().sort("_id", ASCENDING).to_list()

    async def mark_offline(self, node_id: str, seen_before: datetime) -> bool:
        """Mark a node offline if it has not been seen since `seen_before`."""
        result = await self.nodes.update_one(
            {"_id": node_id, "online": True, "last_seen": {"$lt": seen_before}},
            {"$set": {"online": False}},
        )
        return result.modified_count == 1

    # -- output -------------------------------------------------------------------

    async def save_output(
        self, job_id: str, attempt: int, stream: str, data: str, truncated: bool, limit: int
    ) -> None:
        if len(data) > limit:
            data, truncated = data[-limit:], True
        await self.output.update_one(
            {"job_id": job_id, "attempt": attempt, "stream": stream},
            {"$set": {"data": data, "truncated": truncated}},
            upsert=True,
        )

    async def get_output(self, job_id: str, attempt: int) -> dict[str, Document]:
        docs = await self.output.find({"job_id": job_id, "attempt": attempt}).to_list()
        return {doc["stream"]: doc for doc in docs}
