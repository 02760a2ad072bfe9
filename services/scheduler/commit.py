"""Group commit: the job writes that arrive together go to the database as one batch.

Under load, each write used to be its own round trip and its own command, and the
database server spends much of its time per command rather than per document. Here a
write joins the batch being gathered; a batch is sent as soon as the previous one is
answered (so an idle scheduler adds no wait), as one `bulk_write`. Each caller still
learns about its own write:

- an insert, whether it went in or met a unique key (the caller then looks for the
  job it repeats);
- a guarded update (`{_id, rev}`: see store.py), whether its guard held. When the batch
  matched fewer documents than it had guarded updates, the write token each update
  stored (`w`) is read back for those jobs: a guard held exactly where the job now
  carries that update's token.

An update sent with `tracked=False` (dropping published outbox entries, which may
find nothing left to drop) only learns whether its batch was stored. A batch that
fails as a whole (the database is away) fails every write in it; callers retry as
they would a single write.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Any

from pymongo import InsertOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, OperationFailure

from shared.mongo import Document

#: Most writes in one batch.
MAX_BATCH = 1000
DUPLICATE_KEY = 11000


@dataclass
class _Write:
    request: InsertOne[Document] | UpdateOne
    future: asyncio.Future[bool]
    job_id: str = ""
    token: str | None = None  # a tracked update's write token


class GroupCommit:
    """Batches writes to one collection into `bulk_write` calls, one at a time."""

    def __init__(self, collection: AsyncCollection[Document]) -> None:
        self.collection = collection
        self._pending: list[_Write] = []
        self._sender: asyncio.Task[None] | None = None

    async def insert(self, doc: Document) -> bool:
        """Insert `doc`; False when a unique key already names another document."""
        return await self._add(_Write(InsertOne(doc), self._future()))

    async def update(
        self, job_id: str, guard: Document, update: Document, *, tracked: bool = True
    ) -> bool:
        """Apply `update` to the job if it still matches `guard`: whether it did, or
        (untracked) only whether the batch was stored."""
        token = secrets.token_hex(8) if tracked else None
        if token is not None:
            update = {**update, "$set": {**update.get("$set", {}), "w": token}}
        request = UpdateOne({"_id": job_id, **guard}, update)
        return await self._add(_Write(request, self._future(), job_id, token))

    @staticmethod
    def _future() -> asyncio.Future[bool]:
        return asyncio.get_running_loop().create_future()

    async def _add(self, write: _Write) -> bool:
        self._pending.append(write)
        self._kick()
        return await write.future

    def _kick(self) -> None:
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_all(), name="group-commit")

    async def _send_all(self) -> None:
        batch: list[_Write] = []
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                try:
                    await self._send(batch)
                except Exception as exc:  # the database is away: every writer learns it
                    _fail(batch, exc)
        finally:
            self._sender = None
            if self._pending or any(not w.future.done() for w in batch):  # cancelled
                _fail(batch + self._pending, RuntimeError("the scheduler is stopping"))
                self._pending = []

    async def _send(self, batch: list[_Write]) -> None:
        errors: dict[int, Document] = {}
        try:
            result = await self.collection.bulk_write([w.request for w in batch], ordered=False)
            matched = result.matched_count
        except BulkWriteError as exc:
            errors = {error["index"]: error for error in exc.details.get("writeErrors", [])}
            matched = int(exc.details.get("nMatched", 0))
        updates = [i for i, w in enumerate(batch) if isinstance(w.request, UpdateOne)]
        uncertain = matched < len(updates)
        tokens: dict[str, Any] = {}
        if uncertain:
            ids = [batch[i].job_id for i in updates if batch[i].token is not None]
            if ids:
                cursor = self.collection.find({"_id": {"$in": ids}}, {"w": 1})
                tokens = {doc["_id"]: doc.get("w") async for doc in cursor}
        for i, write in enumerate(batch):
            if write.future.done():
                continue
            if i in errors:
                error = errors[i]
                if error.get("code") == DUPLICATE_KEY and isinstance(write.request, InsertOne):
                    write.future.set_result(False)
                else:
                    write.future.set_exception(
                        OperationFailure(error.get("errmsg", "write failed"), error.get("code"))
                    )
            elif write.token is None or not uncertain:
                write.future.set_result(True)
            else:
                write.future.set_result(tokens.get(write.job_id) == write.token)


def _fail(writes: list[_Write], exc: BaseException) -> None:
    for write in writes:
        if not write.future.done():
            write.future.set_exception(exc)
