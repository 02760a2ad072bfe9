"""Eviction: keep the cache under its size budget and drop what outlived its TTL.

Least recently used first, and never an object that a live grant, an unreleased
staging, a staging under way or a job's results name: a job never loses its data
between staging and the end of its run.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import structlog

from services.datacache.blobs import BlobStore
from services.datacache.settings import DatacacheSettings
from services.datacache.store import CacheStore
from shared.envelope import utcnow
from shared.tasks import PeriodicLoop

log = structlog.get_logger("medhive.datacache.eviction")

MIB = 1024 * 1024
#: Objects looked at per round; a cache holds far more than one round needs to free.
BATCH = 10_000


class Evictor(PeriodicLoop):
    task_name = "eviction"
    first_at_once = True

    def __init__(
        self,
        store: CacheStore,
        blobs: BlobStore,
        settings: DatacacheSettings,
        busy: Callable[[], set[str]],
    ) -> None:
        super().__init__(settings.eviction_interval_s)
        self.store, self.blobs, self.settings, self.busy = store, blobs, settings, busy
        #: What the cache's files took after the last round (None before the first):
        #: `/metrics` reports it rather than reading the whole cache directory again.
        self.stored_bytes: int | None = None

    async def tick(self) -> None:
        await self.evict_once()

    async def evict_once(self) -> list[str]:
        """One round: returns the SHA-256 of each object evicted."""
        now = utcnow()
        keep = await self.store.pinned(now) | self.busy()
        budget = self.settings.budget_mb * MIB
        stale_before = now - timedelta(seconds=self.settings.object_ttl_s)
        total = self.blobs.stored_bytes()
        evicted: list[str] = []
        for obj in await self.store.lru(BATCH):
            stale = obj["last_access"] < stale_before
            if total <= budget and not stale:
                break  # everything after this one is fresher still
            if obj["_id"] in keep:
                continue
            stored = self.blobs.stored_size(obj["blob"]) if self.blobs.exists(obj["blob"]) else 0
            await self.store.forget_object(obj["_id"])
            await self.blobs.delete(obj["blob"])
            total -= stored
            evicted.append(obj["_id"])
        self.stored_bytes = total
        if evicted:
            log.info("objects_evicted", count=len(evicted), stored_bytes=total, budget=budget)
        return evicted
