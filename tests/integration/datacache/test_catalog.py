"""The catalog records a fetch's objects in batches, on the real database server."""

from __future__ import annotations

import uuid

from pymongo.asynchronous.database import AsyncDatabase

from services.datacache.store import CacheStore
from shared.mongo import Document


def _blob(n: int) -> tuple[str, str, int]:
    return (f"{n:064x}", uuid.uuid4().hex, n)


async def test_a_batch_records_new_objects_and_names_the_holders_of_known_ones(
    database: AsyncDatabase[Document],
) -> None:
    store = CacheStore(database)
    known, quarantined = _blob(1), _blob(2)
    assert await store.add_objects([known, quarantined], "cardiology") == {
        known[0]: known[1],
        quarantined[0]: quarantined[1],
    }
    await store.quarantine(quarantined[0])
    again, fresh, twice = (known[0], uuid.uuid4().hex, 1), _blob(3), _blob(4)
    replacement = (quarantined[0], uuid.uuid4().hex, 2)
    batch = [again, fresh, twice, (twice[0], uuid.uuid4().hex, 4), replacement]
    holders = await store.add_objects(batch, "radiology")
    assert holders == {
        known[0]: known[1],  # stored before: the caller deletes its copy
        fresh[0]: fresh[1],
        twice[0]: twice[1],  # the same content twice in one batch: the first holds it
        quarantined[0]: replacement[1],  # a quarantined copy is replaced
    }
    for sha256, blob_id in holders.items():
        stored = await store.get_object(sha256)
        assert stored is not None and stored["blob"] == blob_id
        assert not stored["quarantined"]
        assert "radiology" in stored["tenants"]
    assert (await store.get_object(known[0]) or {})["tenants"] == ["cardiology", "radiology"]
