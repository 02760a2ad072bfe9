"""Where a fetch lands: each file a source delivers becomes an encrypted, deduplicated
object, and the job's staging progress is counted and announced as it goes."""

from __future__ import annotations

import posixpath
import time
from collections.abc import AsyncIterable, AsyncIterator

from services.datacache.blobs import BlobStore, Readable, StoredBlob
from services.datacache.documents import FileEntry
from services.datacache.sources.base import FileSink, SourceRefused
from services.datacache.store import CacheStore
from shared.bus import Bus
from shared.messages.data import DataProgress
from shared.mongo import Document

#: Objects recorded in the catalog per round trip.
RECORD_BATCH = 128


class Progress:
    """Files and bytes stored for one job so far, announced a few times a second."""

    def __init__(self, job_id: str, fields: Document, bus: Bus, interval_s: float) -> None:
        #: Envelope fields of the job's data events: the job, its tenant, who submitted it.
        self.fields = fields
        self.job_id, self.bus, self.interval_s = job_id, bus, interval_s
        self.files = self.bytes = 0
        self.input = ""
        self._last = 0.0

    async def advance(self, files: int, nbytes: int) -> None:
        self.files += files
        self.bytes += nbytes
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            await self.bus.emit(
                "data.progress",
                DataProgress(
                    job_id=self.job_id, input=self.input, files=self.files, bytes=self.bytes
                ),
                **self.fields,
            )


class CacheSink(FileSink):
    """Stores each file a source delivers as an encrypted, deduplicated object.

    The catalog learns of the objects in batches (`RECORD_BATCH`), not one round trip
    per file: a study is thousands of small instances, and a database round trip costs
    more than encrypting one. `flush` records the rest; the stager calls it after every
    try, failed or not, so no stored blob is left unrecorded.
    """

    def __init__(
        self, blobs: BlobStore, store: CacheStore, tenant: str, source: str, progress: Progress
    ) -> None:
        self.blobs, self.store, self.tenant, self.source = blobs, store, tenant, source
        self.progress = progress
        self.files: list[FileEntry] = []
        self.bytes = 0
        self._paths: set[str] = set()
        self._unrecorded: list[StoredBlob] = []

    async def put(self, path: str, chunks: AsyncIterable[bytes]) -> None:
        clean = posixpath.normpath(path)
        if path.startswith("/") or clean.startswith("..") or clean in (".", ""):
            raise SourceRefused(f"{self.source} delivered a file named {path!r}")
        if clean in self._paths:
            raise SourceRefused(f"{self.source} delivered {clean!r} twice")
        self._paths.add(clean)
        if isinstance(chunks, Readable):  # read into the blob store's buffers
            blob = await self.blobs.write_from(chunks, self._count)
        else:
            blob = await self.blobs.write(self._counted(chunks))
        self._unrecorded.append(blob)
        self.files.append({"path": clean, "sha256": blob.sha256, "size": blob.size})
        if len(self._unrecorded) >= RECORD_BATCH:
            await self.flush()
        await self.progress.advance(1, 0)

    async def flush(self) -> None:
        """Record the stored blobs in the catalog; delete those whose content it had."""
        batch, self._unrecorded = self._unrecorded, []
        if not batch:
            return
        holders = await self.store.add_objects(
            [(blob.sha256, blob.blob_id, blob.size) for blob in batch], self.tenant
        )
        # Where the same content is stored already, the fresh copy goes.
        await self.blobs.delete(*(b.blob_id for b in batch if holders[b.sha256] != b.blob_id))

    async def _count(self, nbytes: int) -> None:
        self.bytes += nbytes
        await self.progress.advance(0, nbytes)

    async def _counted(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                await self._count(len(chunk))
                yield chunk
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
