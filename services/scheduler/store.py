"""The scheduler's jobs, each with its history and outbox (the nodes are in nodes.py,
what jobs print in output.py).

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

A job is made once per command and per idempotency key: each such key is claimed in
`job_claims` (the key is the claim's `_id`) for the job's id before the job is stored,
and a submission whose key is claimed already is a repeat of the job the claim names.
A claim whose job was never stored (its scheduler died in between) is honoured by the
next submission with that key, which stores the job under the claimed id; two
submissions racing for a key store one job, since a job's id is unique. The keys are
not a unique index on the jobs themselves because every index costs every write of a
job, and the database checked that one at each of a job's four or five writes: with
it, 1.0 ms of database CPU per update and 0.65 per insert; without it, 0.78 and 0.43
(SecantusDB, single writes of a real job document). An HTTP submission without an
idempotency key claims nothing: its command id is made here, for it alone.

One module because every write and read of a job goes through the in-memory `recent`
copies, the revision guard and the outbox layout kept here, and the `observers`
(placement's view) must see each job document that path writes or reads.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase

from services.scheduler.commit import REMOVE, GroupCommit, appended, literal, revision_is
from services.scheduler.documents import (
    HistoryEntry,
    JobCommand,
    JobDocument,
    JobOutbox,
    JobSpecDocument,
    OutboxEntry,
)
from shared.envelope import Envelope, utcnow
from shared.messages.jobs import JobSpec, JobState
from shared.mongo import Document, insert_new

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
#: Fields of a job document that only the store uses (`dedup`: stores of older versions).
INTERNAL_FIELDS = frozenset({"_id", "outbox", "outbox_at", "rev", "w", "dedup"})
#: Most jobs whose outboxes one statement drops entries from.
DROP_CHUNK = 100
#: Claims stored per write when the keys of an older store are claimed at start.
CLAIMS_PER_WRITE = 1000
#: Indexes of older versions, dropped at start.
RETIRED_INDEXES = frozenset({
    "outbox.0_1", "command.sender_1_command.id_1", "tenant_1_idempotency_key_1",
    "state_1_priority_-1", "tenant_1__id_-1", "tenant_1_state_1__id_-1", "dedup_1",
})  # fmt: skip


class IdempotencyConflict(Exception):
    """The same idempotency key, or the same message id from the same sender, was used
    for a different job description."""


@dataclass(frozen=True)
class Submission:
    """What a submit command found: the job it made, or the one it repeats."""

    job: JobDocument
    created: bool
    #: For a repeat, what matched: "message_id" or "idempotency_key".
    matched_by: str | None = None


@dataclass(frozen=True)
class Change:
    """What one write does to a job: fields it sets (dotted paths allowed), entries it
    appends to the history, and messages it adds to the outbox."""

    fields: Document  # an update spec, not a document
    history: list[HistoryEntry]
    outbox: list[OutboxEntry]


def claim_keys(
    tenant: str, command: JobCommand, idempotency_key: str | None, redeliverable: bool = True
) -> list[str]:
    """What a submission claims: the idempotency key within the tenant if there is one,
    then the command's sender and id unless the command cannot come again
    (`redeliverable`). JSON arrays, so that no two keys differ only in where one part
    ends. The idempotency key goes first: a repeat that carries one is recognised by it
    without a claim of its command."""
    keys = []
    if idempotency_key is not None:
        keys.append(json.dumps(["idempotency", tenant, idempotency_key]))
    if redeliverable:
        keys.append(json.dumps(["message", command["sender"], command["id"]]))
    return keys


def marker_for(outbox: Document) -> Document:
    """`outbox_at` as it stays once the outbox is `outbox` (an expression): removed
    when it is empty, else as it was."""
    return {"$cond": [{"$eq": [{"$size": outbox}, 0]}, REMOVE, "$outbox_at"]}


def outbox_entry(envelope: Envelope, node_id: str | None = None) -> OutboxEntry:
    """An outbox item: the message as it is published (JSON bytes) and, for node
    commands, the node it goes to.

    Bytes, not a document: the message is published as it was stored, and the database
    copies it with the job rather than walking every field of it at every write."""
    body = envelope.model_dump_json().encode()
    return {"id": str(envelope.id), "body": body, "node": node_id}


def with_fields(job: JobDocument, fields: Document) -> JobDocument:
    """A copy of `job` with `fields` set as `$set` sets them (dotted paths too)."""
    # An update spec is a plain dict, which mypy cannot check: the job it makes is a
    # JobDocument as far as the spec's fields are the job's.
    return cast(JobDocument, _set(job, fields))


def _set(doc: Mapping[str, Any], fields: Document) -> Document:
    out = dict(doc)
    for key, value in fields.items():
        head, _, rest = key.partition(".")
        out[head] = _set(out.get(head) or {}, {rest: value}) if rest else value
    return out


class JobStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.jobs = db["jobs"]
        self.commit = GroupCommit(self.jobs)
        #: Key -> the job it was first submitted for (see the module's docstring).
        self.claims = db["job_claims"]
        self.claims_commit = GroupCommit(self.claims)
        #: Whole job documents as last written or read here, outbox included.
        self.recent: OrderedDict[str, JobDocument] = OrderedDict()
        #: Told of every job document this store writes or reads whole (placement
        #: keeps its view of the queue and of the capacity in use this way).
        self.observers: list[Callable[[JobDocument], None]] = []

    async def create_indexes(self) -> None:
        """Two indexes besides `_id`, each serving several reads: every index costs
        every write of a job, and a job is written four or five times."""
        present = await self.jobs.index_information()
        if present.keys() & {"dedup_1", "command.sender_1_command.id_1"}:  # older store
            await self._claim_stored_keys()
        # The queue and the capacity in use (by state), and each tenant's job list,
        # newest first (by state and tenant).
        await self.jobs.create_index(
            [("state", ASCENDING), ("tenant", ASCENDING), ("_id", DESCENDING)]
        )
        # Only jobs with messages to publish carry `outbox_at`: the relay's sweep finds
        # them through this index. A scalar key: an index on the outbox itself would
        # be rewritten with every message.
        await self.jobs.create_index([("outbox_at", ASCENDING)], sparse=True)
        if "outbox.0_1" in present:
            await self.jobs.update_many(
                {"outbox.0": {"$exists": True}}, {"$set": {"outbox_at": utcnow()}}
            )
        for name in RETIRED_INDEXES & set(present):
            await self.jobs.drop_index(name)

    # -- jobs ---------------------------------------------------------------------

    async def _claim_stored_keys(self) -> None:
        """Claim the keys of the jobs of an older store, which kept them in a unique
        index of the jobs (dropped once this is done: a restart in between does it
        again, a key claimed already staying as it is)."""
        fields = {"tenant": 1, "command": 1, "idempotency_key": 1}
        claims: list[Document] = []
        async for doc in self.jobs.find({}, fields):
            keys = claim_keys(doc["tenant"], doc["command"], doc.get("idempotency_key"))
            claims.extend({"_id": key, "job": doc["_id"]} for key in keys)
            if len(claims) >= CLAIMS_PER_WRITE:
                await insert_new(self.claims, claims)
                claims = []
        if claims:
            await insert_new(self.claims, claims)

    async def claim(
        self,
        job_id: str,
        tenant: str,
        command: JobCommand,
        idempotency_key: str | None,
        redeliverable: bool = True,
    ) -> str:
        """Claim the submission's keys for the new job `job_id`; returns `job_id`, or
        the id of the job a key was claimed for already (stored, or to be stored under
        that id: see the module's docstring)."""
        for key in claim_keys(tenant, command, idempotency_key, redeliverable):
            if not await self.claims_commit.insert({"_id": key, "job": job_id}):
                claim = await self.claims.find_one({"_id": key})
                if claim is None:
                    raise RuntimeError(f"the claim of {key} clashed and cannot be found")
                return str(claim["job"])
        return job_id

    async def repeated(
        self, job_id: str, tenant: str, spec: JobSpec, command: JobCommand
    ) -> Submission | None:
        """The stored job `job_id` as the answer to a submission that repeats it, or
        None if it is not stored; `IdempotencyConflict` if it describes another job."""
        found = await self.jobs.find_one({"_id": job_id}, {"outbox": 0})
        # What pymongo reads is untyped; every job in `jobs` is a JobDocument.
        existing = cast(JobDocument | None, found)
        if existing is None:
            return None
        matched_by = "message_id" if existing["command"] == command else "idempotency_key"
        if existing["spec"] != spec.model_dump(mode="json") or existing["tenant"] != tenant:
            raise IdempotencyConflict(existing["_id"], matched_by)
        return Submission(existing, False, matched_by)

    async def insert_job(
        self,
        job_id: str,
        tenant: str,
        actor: str | None,
        spec: JobSpec,
        command: JobCommand,
        history: list[HistoryEntry],
        outbox: list[OutboxEntry],
        then: Callable[[JobDocument], Change | None] | None = None,
    ) -> Submission:
        """Store a new job under the id its keys were claimed for (`claim`), or find
        the one stored under it meanwhile (`repeated`).

        `command` is `{"id", "sender"}`: the id of the message (or HTTP request) that
        asked, and who sent it.

        `then` decides a first change of the new job (a job placed as it arrives),
        stored with it in the same insert: a state nobody waits in costs no write.
        """
        now = utcnow()
        doc: JobDocument = {
            "_id": job_id,
            "tenant": tenant,
            "actor": actor,
            "name": spec.name,
            # model_dump is untyped: JobSpecDocument is JobSpec's JSON.
            "spec": cast(JobSpecDocument, spec.model_dump(mode="json")),
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
        if then is not None and (change := then(doc)) is not None:
            doc = with_fields(doc, change.fields)
            doc["history"] = [*history, *change.history]
            doc["outbox"] = [*outbox, *change.outbox]
            if doc["outbox"]:
                doc["outbox_at"] = now
        if await self.commit.insert(doc):
            self._remember(doc)
            return Submission(doc, True)
        repeat = await self.repeated(job_id, tenant, spec, command)
        if repeat is None:
            raise RuntimeError(f"job {job_id} clashed with a job that cannot be found")
        return repeat

    async def get(self, job_id: str, tenant: str | None = None) -> JobDocument | None:
        query: Document = {"_id": job_id}
        if tenant is not None:
            query["tenant"] = tenant
        return cast(JobDocument | None, await self.jobs.find_one(query, {"outbox": 0}))

    async def page(
        self,
        tenant: str | None,
        state: str | None,
        before: str | None,
        limit: int,
        name_prefix: str | None = None,
    ) -> list[JobDocument]:
        """Jobs newest first: a tenant's, or every tenant's (`tenant` None)."""
        # Every state when none is asked for: the index leads with the state.
        query: Document = {"state": state or {"$in": [s.value for s in JobState]}}
        if tenant is not None:
            query["tenant"] = tenant
        if name_prefix is not None:
            query["name"] = {"$regex": f"^{re.escape(name_prefix)}"}
        if before is not None:
            query["_id"] = {"$lt": before}
        cursor = self.jobs.find(query, {"outbox": 0, "history": 0}).sort("_id", DESCENDING)
        return cast(list[JobDocument], await cursor.limit(limit).to_list())

    # -- writing jobs ---------------------------------------------------------------

    def _remember(self, job: JobDocument) -> None:
        for observe in self.observers:
            observe(job)
        self.recent[job["_id"]] = job
        self.recent.move_to_end(job["_id"])
        if len(self.recent) > RECENT_JOBS:
            self.recent.popitem(last=False)

    async def current(
        self, job_id: str, *, fresh: bool = False, seen: JobDocument | None = None
    ) -> JobDocument | None:
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
        job = cast(JobDocument | None, await self.jobs.find_one({"_id": job_id}))
        if job is not None:
            self._remember(job)
        else:
            self.recent.pop(job_id, None)
        return job

    async def apply(
        self, job: JobDocument, change: Change, published: set[str]
    ) -> JobDocument | None:
        """Store `change` if the job is still at the revision `job` has; returns the
        job as written, or None when it changed meanwhile (read it again).

        When `job` has its outbox, the outbox is replaced by its entries not in
        `published` plus the new ones; otherwise the new ones are appended.
        """
        now = utcnow()
        rev = job.get("rev")
        fields: Document = {**change.fields, "updated_at": now, "rev": (rev or 0) + 1}
        written = with_fields(job, fields)
        # A dotted path sets its whole top-level field, as `job` has it with the change:
        # the guard makes sure the stored job is that one (only history and outbox are
        # ever left out of a job read here).
        heads: Mapping[str, Any] = written  # by name, whichever fields the change sets
        update: dict[str, Any] = {
            head: literal(heads[head]) for head in {k.partition(".")[0] for k in fields}
        }
        if change.history:
            update["history"] = appended("history", change.history)
            if "history" in job:
                written["history"] = [*job["history"], *change.history]
        if "outbox" in job:
            outbox = [e for e in job["outbox"] if e["id"] not in published] + change.outbox
            written["outbox"] = outbox
            update["outbox"] = literal(outbox)
            update["outbox_at"] = literal(now) if outbox else REMOVE
            if outbox:
                written["outbox_at"] = now
            else:
                written.pop("outbox_at", None)
        elif change.outbox:
            update["outbox"] = appended("outbox", change.outbox)
            update["outbox_at"] = literal(now)
        if not await self.commit.update(job["_id"], update, when=revision_is(rev)):
            self.recent.pop(job["_id"], None)
            return None
        if "history" in job and "outbox" in job:
            self._remember(written)
        else:
            self.recent.pop(job["_id"], None)
            for observe in self.observers:
                observe(written)
        return written

    async def drop_outboxes(self, published: dict[str, set[str]]) -> None:
        """Remove published entries from the outboxes of many jobs (job id -> entry
        ids); a job whose outbox is left empty loses its marker in the same write.

        One statement per `DROP_CHUNK` jobs: the database checks a statement and reads
        the collection's indexes once for all the documents it changes, and entry ids
        are unique, so one list of them serves every job."""
        job_ids = sorted(published)
        for start in range(0, len(job_ids), DROP_CHUNK):
            chunk = job_ids[start : start + DROP_CHUNK]
            ids = sorted(set().union(*(published[job_id] for job_id in chunk)))
            kept = {
                "$filter": {
                    "input": {"$ifNull": ["$outbox", []]},
                    "cond": {"$not": [{"$in": ["$$this.id", ids]}]},
                }
            }
            marker = marker_for(kept)
            await self.jobs.update_many(
                {"_id": {"$in": chunk}}, [{"$set": {"outbox": kept, "outbox_at": marker}}]
            )
        for job_id, dropped in published.items():
            if (known := self.recent.get(job_id)) is not None:
                outbox = [e for e in known["outbox"] if e["id"] not in dropped]
                self.recent[job_id] = {**known, "outbox": outbox}
                if not outbox:
                    self.recent[job_id].pop("outbox_at", None)

    async def clear_outbox_mark(self, job_id: str) -> None:
        """Unmark the job if its outbox is empty (stores of older versions could leave
        one so): the sweep looks no further."""
        marker = marker_for({"$ifNull": ["$outbox", []]})
        await self.commit.update(job_id, {"outbox_at": marker}, tracked=False)

    async def placeable(self) -> list[JobDocument]:
        """Jobs waiting for a node or holding room on one (queued; staging; dispatched;
        running), without history and outbox: what placement starts from."""
        states = [JobState.queued, JobState.staging, JobState.dispatched, JobState.running]
        query = {"state": {"$in": [state.value for state in states]}}
        jobs = await self.jobs.find(query, {"outbox": 0, "history": 0}).to_list()
        return cast(list[JobDocument], jobs)

    async def outboxes(self, job_ids: set[str]) -> list[JobOutbox]:
        """The outboxes of these jobs."""
        cursor = self.jobs.find({"_id": {"$in": sorted(job_ids)}}, {"outbox": 1})
        return cast(list[JobOutbox], await cursor.to_list())

    async def with_outbox(self, settled_s: float = 0.0, limit: int = 500) -> list[JobOutbox]:
        """Jobs whose outbox was last written at least `settled_s` ago and may still
        hold messages (the writer itself publishes what is newer)."""
        before = utcnow() - timedelta(seconds=settled_s)
        cursor = self.jobs.find({"outbox_at": {"$lte": before}}, {"outbox": 1})
        return cast(list[JobOutbox], await cursor.limit(limit).to_list())
