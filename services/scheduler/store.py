"""The scheduler's collections: jobs (with history and outbox), nodes, and job output.

Every state change goes through `JobStore.transition`, which checks the move against
`ALLOWED` and, in the same single-document update, appends the history entry and the
messages that announce it to the job's outbox. A crash after the update loses nothing:
the relay publishes whatever an outbox still holds (see outbox.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

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


def outbox_entry(envelope: Envelope, node_id: str | None = None) -> Document:
    """An outbox item: the message and, for node commands, the node it goes to."""
    return {"id": str(envelope.id), "envelope": envelope.model_dump(mode="json"), "node": node_id}


class JobStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.jobs = db["jobs"]
        self.nodes = db["nodes"]
        self.output = db["output"]

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
        await self.jobs.create_index([("outbox.0", ASCENDING)], sparse=True)
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
        }
        if spec.idempotency_key is not None:
            doc["idempotency_key"] = spec.idempotency_key
        try:
            await self.jobs.insert_one(doc)
            return Submission(doc, True)
        except DuplicateKeyError:
            pass
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

    async def transition(
        self,
        job_id: str,
        to: JobState,
        *,
        reason: str | None,
        outbox: list[Document],
        expect: dict[str, Any] | None = None,
        set_fields: dict[str, Any] | None = None,
    ) -> bool:
        """Move a job to `to` if its current state allows it (and `expect` matches).

        Returns False when the job is not in a state that may move there: a duplicate
        or late message, which callers ignore. A guarded `update_one` rather than a
        find-and-modify: callers know what they wrote, and it is the cheaper operation
        on every MongoDB-protocol server (on SecantusDB by a factor that grows with
        the collection).
        """
        now = utcnow()
        sources = [state.value for state, targets in ALLOWED.items() if to in targets]
        query: Document = {"_id": job_id, "state": {"$in": sources}, **(expect or {})}
        entry: Document = {"state": to.value, "at": now, "reason": reason}
        fields = {"state": to.value, "updated_at": now, **(set_fields or {})}
        for key in ("attempt", "node_id", "exit_code"):
            if key in fields:
                entry[key] = fields[key]
        result = await self.jobs.update_one(
            query, {"$set": fields, "$push": {"history": entry, "outbox": {"$each": outbox}}}
        )
        return result.matched_count == 1

    async def update_flags(
        self,
        job_id: str,
        fields: dict[str, Any],
        outbox: list[Document],
        expect: dict[str, Any] | None = None,
        note: Document | None = None,
    ) -> bool:
        """Set fields of a job without changing its state (cancel requested, walltime
        enforced, inputs staged, grant received), with the messages that go with it and
        optionally a note in its history."""
        push: Document = {"outbox": {"$each": outbox}}
        if note is not None:
            push["history"] = note
        result = await self.jobs.update_one(
            {"_id": job_id, **(expect or {})}, {"$set": fields, "$push": push}
        )
        return result.matched_count == 1

    async def queued(self, limit: int) -> list[Document]:
        """Jobs waiting for a node (queued, or staging with their inputs staged), highest
        priority first, then oldest first."""
        ready = {"$or": [{"state": JobState.queued.value},
                         {"state": JobState.staging.value, "inputs_staged": True}]}  # fmt: skip
        cursor = self.jobs.find(ready, {"outbox": 0, "history": 0})
        return (
            await cursor.sort([("priority", DESCENDING), ("_id", ASCENDING)]).limit(limit).to_list()
        )

    async def placed(self) -> list[Document]:
        """Jobs that hold capacity on a node."""
        cursor = self.jobs.find(
            {"state": {"$in": [JobState.dispatched.value, JobState.running.value]}},
            {"node_id": 1, "spec.resources": 1, "deadline": 1, "attempt": 1, "state": 1,
             "tenant": 1, "walltime_enforced_at": 1, "cancel_requested": 1},
        )  # fmt: skip
        return await cursor.to_list()

    async def with_outbox(self, limit: int = 500) -> list[Document]:
        return (
            await self.jobs.find({"outbox.0": {"$exists": True}}, {"outbox": 1})
            .limit(limit)
            .to_list()
        )

    async def drop_outboxes(self, published: dict[str, set[str]]) -> None:
        """Remove entries from the outboxes of many jobs (job id -> entry ids) at once."""
        await self.jobs.bulk_write(
            [
                UpdateOne({"_id": job_id}, {"$pull": {"outbox": {"id": {"$in": sorted(ids)}}}})
                for job_id, ids in published.items()
            ],
            ordered=False,
        )

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
