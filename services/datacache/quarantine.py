"""Setting a damaged object aside: one rule for every place that finds one.

A node's read that fails authentication, the datacache's own check of a blob, and a
staging that finds a cached object's file gone all end the same way: the blob's file
(if any) moves to `quarantine/` for an operator to examine, the catalog marks the object
so no grant serves it and the next fetch of its source replaces it, no read reuses what
it remembered of the object, and operators hear of it (`data.quarantined`).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from services.datacache.blobs import BlobStore
from services.datacache.grants import GrantService
from services.datacache.store import CacheStore
from shared.bus import Bus
from shared.messages.data import DataQuarantined

log = structlog.get_logger("medhive.datacache.quarantine")


@dataclass(frozen=True)
class Quarantine:
    blobs: BlobStore
    store: CacheStore
    grants: GrantService
    bus: Bus

    async def __call__(
        self, sha256: str, blob_id: str, reason: str, job_id: str | None = None
    ) -> None:
        await self.blobs.quarantine(blob_id)
        await self.store.quarantine(sha256)
        self.grants.forget_objects()
        log.error("object_quarantined", object=sha256, reason=reason)
        await self.bus.emit(
            "data.quarantined",
            DataQuarantined(object=sha256, reason=reason, job_id=job_id),
            correlation_id=job_id,
        )
