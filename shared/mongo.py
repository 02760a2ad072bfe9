"""MongoDB through PyMongo's native asyncio API (the successor of motor).

Every service connects through `connect`, so the rules of durability are here:

- **Writes wait for a majority** (`w="majority"`) by default. On a replica set a write
  acknowledged by the primary alone is rolled back if the primary fails before a
  secondary has it: a job stored as submitted, a state change with the messages that
  announce it, an audit block, a grant or a revocation would be gone after the
  failover although the caller was told it was stored. On a single server "majority"
  is that server, at no extra cost.
- **Writes and reads are retried once** across a failover (`retryWrites`,
  `retryReads`): the driver sends the same write again with the same transaction
  number, and the server applies it once.
- **Reads see the primary's local data** (the default read concern). A decision made
  on a read that a failover rolled back is caught by the write that follows it: job
  changes are guarded by the job's revision, audit blocks by the chain's unique `prev`.
- **One exception, named where it is made:** the datacache's `last_access` stamps (an
  eviction hint written on every read of an object) use `w=1`, see `ADVISORY`; losing
  one makes an object look older, never loses data.

A replica-set URL (`mongodb://a,b,c/?replicaSet=rs0`) is used as it is.
"""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient, WriteConcern
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from shared.settings import MongoSettings

Document = dict[str, Any]

#: The server's error code for a write refused by a unique index.
DUPLICATE_KEY = 11000

#: The write concern of writes whose loss in a failover costs nothing but a hint.
ADVISORY = WriteConcern(w=1)


def connect(settings: MongoSettings) -> AsyncMongoClient[Document]:
    """A client with UTC-aware datetimes and majority writes; it connects lazily on
    first use. A URL's own options (`w=`, `retryWrites=`) take precedence."""
    url = settings.url.get_secret_value()
    durable = _unless_in_url(url, w="majority", retryWrites=True, retryReads=True)
    return AsyncMongoClient(url, tz_aware=True, serverSelectionTimeoutMS=10_000, **durable)


async def insert_new(collection: AsyncCollection[Any], docs: list[Any]) -> set[int]:
    """Insert the `docs` whose unique keys are free, in one write; returns the
    positions of those left out because a stored document has their key."""
    try:
        await collection.insert_many(docs, ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(error.get("code") != DUPLICATE_KEY for error in errors):
            raise
        return {error["index"] for error in errors}
    return set()


def _unless_in_url(url: str, **options: Any) -> dict[str, Any]:
    """`options` without those the URL sets itself (an operator's choice wins)."""
    query = url.partition("?")[2].lower()
    given = {part.partition("=")[0] for part in query.split("&") if part}
    return {name: value for name, value in options.items() if name.lower() not in given}
