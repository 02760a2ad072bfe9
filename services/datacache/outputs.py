"""A job's results after it ends: announced to the scheduler, sent on to a destination.

The upload to the destination the job named (an XNAT resource, a STOW-RS endpoint, an
HTTP URL) is recorded before it starts and resumed by a restarted datacache, and its
outcome is published as `data.uploaded` either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import structlog

from services.datacache.blobs import BlobStore
from services.datacache.retries import with_retries
from services.datacache.settings import DatacacheSettings
from services.datacache.sources.base import OpenFile, ResultFile, SourceError
from services.datacache.sources.registry import SourceDirectory
from services.datacache.store import CacheStore
from shared.bus import Bus
from shared.envelope import Envelope
from shared.messages.data import DataOutputs, DataRelease, DataUploaded, StagedFile
from shared.mongo import Document

log = structlog.get_logger("medhive.datacache.outputs")


class ResultUploader:
    def __init__(
        self,
        store: CacheStore,
        blobs: BlobStore,
        sources: SourceDirectory,
        bus: Bus,
        http: aiohttp.ClientSession,
        settings: DatacacheSettings,
    ) -> None:
        self.store, self.blobs, self.sources, self.bus = store, blobs, sources, bus
        self.http, self.settings = http, settings
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for doc in await self.store.pending_uploads():
            self._spawn(doc)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def job_ended(self, envelope: Envelope, command: DataRelease) -> None:
        """Announce the job's stored results, and start their upload if one is asked."""
        results = await self.store.job_results(command.job_id)
        if not results:
            return
        files = [StagedFile(path=r["path"], sha256=r["sha256"], size=r["size"]) for r in results]
        await self.bus.emit(
            "data.outputs",
            DataOutputs(
                job_id=command.job_id,
                attempt=max(r["attempt"] for r in results),
                files=files,
                bytes=sum(f.size for f in files),
            ),
            **envelope.caused(),
        )
        if command.upload_to is not None:
            doc = await self.store.open_upload(
                command.job_id, results[0]["tenant"], command.upload_to, envelope.caused()
            )
            if doc is not None:
                self._spawn(doc)

    def _spawn(self, doc: Document) -> None:
        task = asyncio.create_task(self._upload(doc), name=f"upload-{doc['_id']}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _upload(self, doc: Document) -> None:
        job_id, tenant, destination = doc["_id"], doc["tenant"], doc["destination"]
        results = await self.store.job_results(job_id, tenant)
        files = [
            ResultFile(path=r["path"], size=r["size"], open=self._opener(r["sha256"]))
            for r in results
        ]
        try:
            source, ref = self.sources.open(tenant, destination, self.http)
            detail = await with_retries(
                self.settings, source.canonical(ref), lambda: source.upload(ref, files)
            )
            ok = True
        except SourceError as exc:
            detail, ok = str(exc), False
        await self.store.finish_upload(job_id, ok, detail)
        log.info(
            "results_uploaded" if ok else "results_upload_failed",
            job_id=job_id,
            destination=destination,
            detail=detail,
        )
        await self.bus.emit(
            "data.uploaded",
            DataUploaded(job_id=job_id, destination=destination, ok=ok, detail=detail),
            **doc["envelope"],
        )

    def _opener(self, sha256: str) -> OpenFile:
        async def open_result() -> AsyncIterator[bytes]:
            obj = await self.store.get_object(sha256)
            if obj is None:
                raise SourceError(f"result object {sha256} is no longer held")
            async for chunk in self.blobs.read(obj["blob"]):
                yield chunk

        return open_result
