"""The audit database: records kept in blocks, in the order of their gapless `seq`.

A block is one document holding the records of one write, in `seq` order, with what
finds them: their ids, the jobs, tenants and types they concern (`lookup`) and the
span of their times. The database's work is mostly per document written, much less
per byte: replaying the writes of a benchmark run on the SecantusDB server used here,
a record cost 0.52 ms as a document of its own (five indexes) and 0.10 ms in blocks
of about a hundred, and the audit stores eight records per job.

What the store promises with blocks is what it promised with a document per record:
- a message is stored once: `ids` is unique across blocks (a multikey index);
- one writer appends at a time: `prev`, the `seq` a block follows, is unique, so two
  recorders that both read the same head cannot both append after it;
- a reader asks for records by job, tenant, type and time, `after` a `seq`: blocks
  are found through `lookup` or `last` and the records in them are picked here.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime

import bson
from aiohttp import web
from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase

from shared.mongo import Document

#: Most bytes of records in one block (a document may have 16 MiB).
BLOCK_BYTES = 4 * 1024 * 1024
#: Records moved into blocks per write when a store of an older version is taken over.
UPGRADE_BATCH = 500
#: Records' worth of `seq` one query reads blocks for (see `AuditStore._blocks`).
WINDOW = 10_000
#: Blocks per batch of a cursor over them (each may hold a few hundred records).
BLOCKS_PER_BATCH = 10
#: What a block is looked up by: kind of key -> the record's field.
LOOKUP_FIELDS = {"job": "job_id", "tenant": "tenant", "type": "type"}


@dataclass(frozen=True)
class RecordQuery:
    """Which records a reader asked for (and, for a user, is allowed to see)."""

    job: str | None = None
    tenant: str | None = None
    type_prefix: str | None = None
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive

    def block_filter(self) -> Document:
        """What the blocks that may hold matching records have: the job if asked for
        (the most selective key), else the tenant, and times that overlap."""
        found: Document = {}
        if self.job is not None:
            found["lookup"] = lookup_key("job", self.job)
        elif self.tenant is not None:
            found["lookup"] = lookup_key("tenant", self.tenant)
        if self.since is not None:
            found["last_at"] = {"$gte": self.since}
        if self.until is not None:
            found["first_at"] = {"$lt": self.until}
        return found

    def matches(self, record: Document) -> bool:
        """Whether a record of a block found by `block_filter` is one asked for."""
        if self.job is not None and record.get("job_id") != self.job:
            return False
        if self.tenant is not None and record.get("tenant") != self.tenant:
            return False
        if self.type_prefix and not str(record.get("type", "")).startswith(self.type_prefix):
            return False
        occurred = record.get("occurred_at")
        if self.since is not None and (occurred is None or occurred < self.since):
            return False
        return not (self.until is not None and (occurred is None or occurred >= self.until))


def lookup_key(kind: str, value: str) -> str:
    return f"{kind}:{value}"


def block_of(records: list[Document], prev: int) -> Document:
    """The block holding `records` (in `seq` order), following the record `prev`."""
    lookup = {
        lookup_key(kind, value)
        for record in records
        for kind, field in LOOKUP_FIELDS.items()
        if isinstance(value := record.get(field), str)
    }
    times = [record["occurred_at"] for record in records]
    return {
        "_id": records[0]["seq"],
        "prev": prev,
        "last": records[-1]["seq"],
        "ids": [record["_id"] for record in records],
        "lookup": sorted(lookup),
        "first_at": min(times),
        "last_at": max(times),
        "records": records,
    }


def blocks_of(records: list[Document], prev: int) -> list[Document]:
    """`records` cut into blocks of at most `BLOCK_BYTES` (one record may exceed it)."""
    blocks: list[Document] = []
    current: list[Document] = []
    size = 0
    for record in records:
        record_bytes = len(bson.encode(record))
        if current and size + record_bytes > BLOCK_BYTES:
            blocks.append(block_of(current, prev))
            prev, current, size = current[-1]["seq"], [], 0
        current.append(record)
        size += record_bytes
    if current:
        blocks.append(block_of(current, prev))
    return blocks


class AuditStore:
    """Records in blocks (`blocks`); a record's `_id` is its message id."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.blocks = db["blocks"]
        self.legacy = db["records"]  # one document per record, as older versions kept them

    async def ensure_indexes(self) -> None:
        await self.blocks.create_indexes(
            [
                IndexModel([("prev", ASCENDING)], unique=True),
                IndexModel([("ids", ASCENDING)], unique=True),
                IndexModel([("last", ASCENDING)]),
                IndexModel([("lookup", ASCENDING), ("last", ASCENDING)]),
                IndexModel([("last_at", ASCENDING)]),
            ]
        )
        await self._take_over_legacy()

    async def _take_over_legacy(self) -> None:
        """Move the records of an older store into blocks, as they are, oldest first
        (a move cut short goes on from where it stopped at the next start)."""
        if await self.legacy.find_one({}, {"_id": 1}) is None:
            return
        last = await self.last()
        done = 0 if last is None else int(last["seq"])
        cursor = self.legacy.find({"seq": {"$gt": done}}).sort("seq", ASCENDING)
        batch: list[Document] = []
        async for record in cursor:
            batch.append(record)
            if len(batch) == UPGRADE_BATCH:
                await self.insert(batch)
                batch = []
        if batch:
            await self.insert(batch)
        await self.legacy.drop()

    async def last(self) -> Document | None:
        """The record with the highest `seq`: where the chain continues."""
        block = await self.blocks.find_one(sort=[("last", DESCENDING)])
        return None if block is None else dict(block["records"][-1])

    async def digests(self, ids: Iterable[str]) -> dict[str, str]:
        """Body digests of the records among `ids` that are already stored."""
        wanted = set(ids)
        projection = {"records._id": 1, "records.body_sha256": 1}
        cursor = self.blocks.find({"ids": {"$in": sorted(wanted)}}, projection)
        return {
            record["_id"]: record.get("body_sha256", "")
            async for block in cursor
            for record in block["records"]
            if record["_id"] in wanted
        }

    async def insert(self, records: list[Document]) -> None:
        """Store in order, after the record before the first (if a block fails, those
        after it are not stored either)."""
        if records:
            prev = int(records[0]["seq"]) - 1
            await self.blocks.insert_many(blocks_of(records, prev), ordered=True)

    async def page(
        self, query: RecordQuery, *, after: int, limit: int, upto: int | None = None
    ) -> list[Document]:
        """Up to `limit` matching records with `after < seq <= upto`, oldest first."""
        found: list[Document] = []
        async with contextlib.aclosing(self._blocks(query.block_filter(), after, upto)) as blocks:
            async for block in blocks:
                for record in block["records"]:
                    seq = record["seq"]
                    if upto is not None and seq > upto:
                        return found
                    if seq > after and query.matches(record):
                        found.append(record)
                        if len(found) == limit:
                            return found
        return found

    async def in_seq_order(self) -> AsyncIterator[Document]:
        """Every record, oldest first (for verification)."""
        async with contextlib.aclosing(self._blocks({}, 0, None)) as blocks:
            async for block in blocks:
                for record in block["records"]:
                    yield record

    async def _blocks(
        self, wanted: Document, after: int, upto: int | None
    ) -> AsyncGenerator[Document, None]:
        """The blocks matching `wanted` that hold records after `after` (up to `upto`,
        else the newest), in order, read `WINDOW` records' worth of `seq` at a time.

        The database reads every document an index range matches before it answers the
        first batch, even under a limit (on SecantusDB, 360 ms for the first two of
        3,000 blocks): an open range from an old `seq` would read the whole store."""
        if upto is None:
            newest = await self.blocks.find_one(sort=[("last", DESCENDING)], projection={"last": 1})
            upto = 0 if newest is None else int(newest["last"])
        start = after
        while start < upto:
            bound = start + WINDOW
            # The last window is open above: a block that holds `upto` may end after it.
            last: Document = {"$gt": start} if bound >= upto else {"$gt": start, "$lte": bound}
            cursor = self.blocks.find({**wanted, "last": last}).sort("last", ASCENDING)
            try:
                async for block in cursor.batch_size(BLOCKS_PER_BATCH):
                    yield block
            finally:
                await cursor.close()
            start = bound

    async def misfiled(self) -> int | None:
        """The first `seq` of the first block whose finding fields (`ids`, `lookup`,
        times, span, `prev`) are not what its records make them, if any: a block
        changed so that its records would not be found where they should be."""
        async with contextlib.aclosing(self._blocks({}, 0, None)) as blocks:
            async for block in blocks:
                records = block["records"]
                expected = block_of(records, int(records[0]["seq"]) - 1) if records else None
                if expected is None or any(block.get(k) != v for k, v in expected.items()):
                    return int(block["_id"])
        return None


STORE = web.AppKey("audit_store", AuditStore)

__all__ = ["STORE", "AuditStore", "RecordQuery"]
