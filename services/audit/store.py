"""The audit database: one collection of records, ordered by their gapless `seq`."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web
from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase

from shared.mongo import Document


@dataclass(frozen=True)
class RecordQuery:
    """Which records a reader asked for (and, for a user, is allowed to see)."""

    job: str | None = None
    tenant: str | None = None
    type_prefix: str | None = None
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive

    def to_filter(self, after: int, upto: int | None) -> Document:
        """The MongoDB filter: these criteria, and `after < seq <= upto`."""
        seq: Document = {"$gt": after}
        if upto is not None:
            seq["$lte"] = upto
        found: Document = {"seq": seq}
        if self.job is not None:
            found["job_id"] = self.job
        if self.tenant is not None:
            found["tenant"] = self.tenant
        if self.type_prefix:
            # An anchored, escaped prefix: MongoDB answers it from the (type, seq) index.
            found["type"] = {"$regex": "^" + re.escape(self.type_prefix)}
        occurred: Document = {}
        if self.since is not None:
            occurred["$gte"] = self.since
        if self.until is not None:
            occurred["$lt"] = self.until
        if occurred:
            found["occurred_at"] = occurred
        return found


class AuditStore:
    """Records in `records`; `_id` is the message id, so a message is stored once."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.records = db["records"]

    async def ensure_indexes(self) -> None:
        """`seq` unique (two writers cannot both take a number); one index per query key."""
        await self.records.create_indexes(
            [
                IndexModel([("seq", ASCENDING)], unique=True),
                IndexModel([("tenant", ASCENDING), ("seq", ASCENDING)]),
                IndexModel([("job_id", ASCENDING), ("seq", ASCENDING)]),
                IndexModel([("type", ASCENDING), ("seq", ASCENDING)]),
                IndexModel([("occurred_at", ASCENDING)]),
            ]
        )

    async def last(self) -> Document | None:
        """The record with the highest `seq`: where the chain continues."""
        return await self.records.find_one(sort=[("seq", DESCENDING)])

    async def digests(self, ids: Iterable[str]) -> dict[str, str]:
        """Body digests of the records among `ids` that are already stored."""
        cursor = self.records.find({"_id": {"$in": list(ids)}}, {"body_sha256": 1})
        return {doc["_id"]: doc.get("body_sha256", "") async for doc in cursor}

    async def insert(self, records: list[Document]) -> None:
        """Store in order: if one fails, those after it are not stored either."""
        await self.records.insert_many(records, ordered=True)

    async def page(
        self, query: RecordQuery, *, after: int, limit: int, upto: int | None = None
    ) -> list[Document]:
        """Up to `limit` matching records with `after < seq <= upto`, oldest first."""
        cursor = self.records.find(query.to_filter(after, upto)).sort("seq", ASCENDING)
        return await cursor.limit(limit).to_list()

    async def in_seq_order(self) -> AsyncIterator[Document]:
        """Every record, oldest first (for verification)."""
        async for record in self.records.find().sort("seq", ASCENDING).batch_size(1000):
            yield record

    async def count(self) -> int:
        return await self.records.count_documents({})


STORE = web.AppKey("audit_store", AuditStore)

__all__ = ["STORE", "AuditStore", "RecordQuery"]
