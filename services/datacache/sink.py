"""Where a fetch lands: each file a source delivers becomes an encrypted, deduplicated
object, and the job's staging progress is counted and announced as it goes."""

from __future__ import annotations

import posixpath
import time
from collections.abc import AsyncIterable, AsyncIterator

from services.datacache.blobs import BlobStore
from services.datacache.sources.base import FileSink, SourceRefused
from services.datacache.store import CacheStore
from shared.bus import Bus
from shared.messages.data import DataProgress
from shared.mongo import Document


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
    """Stores each file a source delivers as an encrypted, deduplicated object."""

    def __init__(
        self, blobs: BlobStore, store: CacheStore, tenant: str, source: str, progress: Progress
    ) -> None:
        self.blobs, self.store, self.tenant, self.source = blobs, store, tenant, source
        self.progress = progress
        self.files: list[Document] = []
        self.bytes = 0

    async def put(self, path: str, chunks: AsyncIterable[bytes]) -> None:
        clean = posixpath.normpath(path)
        if path.startswith("/") or clean.startswith("..") or clean in (".", ""):
            raise SourceRefused(f"{self.source} delivered a file named {path!r}")
        if any(f["path"] == clean for f in self.files):
            raise SourceRefused(f"{self.source} delivered {clean!r} twice")
        blob = await self.blobs.write(self._counted(chunks))
        holder = await self.store.add_object(blob.sha256, blob.blob_id, blob.size, self.tenant)
        if holder != blob.blob_id:
            await self.blobs.delete(blob.blob_id)  # the same content is stored already
        self.files.append({"path": clean, "sha256": blob.sha256, "size": blob.size})
        await self.progress.advance(1, 0)

    async def _counted(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                self.bytes += len(chunk)
                await self.progress.advance(0, len(chunk))
                yield chunk
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
