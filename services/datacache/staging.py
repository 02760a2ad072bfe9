"""Staging: bring a job's inputs into the cache, fetching only what it does not hold.

For each input the source is probed for its version (cheap: an ETag, a listing, a
query), and what that tenant's source held at that version is looked up. Only a miss
fetches, and concurrent misses on the same key share one fetch. A fetch that fails
with `SourceUnavailable` is tried again with doubling waits; `SourceRefused` fails at
once. Everything a staging decides is stored before it is announced, and a restarted
datacache resumes stagings that were under way: the job still gets its data.

One module because it is the one `Stager`, whose per-job tasks, shared fetches in
flight (`_inflight`), fetch slots and `in_use` objects (which eviction reads) all belong
to the stagings under way; the cache lookup, the shared fetch and the announcement are
steps of one staging over that state.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import structlog
from prometheus_client import Counter, Histogram

from services.datacache.blobs import BlobStore
from services.datacache.documents import ManifestEntry, ObjectDoc, StagingDoc
from services.datacache.quarantine import Quarantine
from services.datacache.retries import with_retries
from services.datacache.settings import DatacacheSettings
from services.datacache.sink import CacheSink, Progress
from services.datacache.sources.base import (
    Source,
    SourceError,
    SourceRef,
    SourceUnavailable,
)
from services.datacache.sources.registry import SourceDirectory
from services.datacache.store import CacheStore, source_key
from shared.bus import Bus
from shared.envelope import Envelope
from shared.messages.data import (
    DataFailed,
    DataFetched,
    DataStage,
    DataStaged,
    InputSpec,
    StagedInput,
)
from shared.metrics import with_series
from shared.mongo import Document

log = structlog.get_logger("medhive.datacache.staging")


class Stager:
    """Runs the stagings of jobs, one task each, and shares fetches between them."""

    def __init__(
        self,
        store: CacheStore,
        blobs: BlobStore,
        sources: SourceDirectory,
        bus: Bus,
        http: aiohttp.ClientSession,
        settings: DatacacheSettings,
        quarantine: Quarantine,
    ) -> None:
        self.store, self.blobs, self.sources, self.bus = store, blobs, sources, bus
        self.http, self.settings, self.quarantine = http, settings, quarantine
        self._inflight: dict[str, asyncio.Future[Document]] = {}
        self._slots = asyncio.Semaphore(settings.concurrent_fetches)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: Objects that stagings under way have found or fetched but not yet pinned.
        self.in_use: dict[str, set[str]] = {}
        # Added to the app's /metrics by the app (services/datacache/metrics.py).
        self.fetched_bytes = Counter(
            "medhive_datacache_fetched_bytes",
            "Bytes of inputs fetched from their sources into the cache (whole fetches).",
            registry=None,
        )
        self.hits = Counter(
            "medhive_datacache_cache_hits",
            "Inputs staging found in the cache, or being fetched for another job already.",
            registry=None,
        )
        self.misses = Counter(
            "medhive_datacache_cache_misses",
            "Inputs staging had to fetch from their source.",
            registry=None,
        )
        self.staging_seconds = with_series(
            Histogram(
                "medhive_datacache_staging_seconds",
                "How long staging a job's inputs took, by outcome (staged or failed).",
                ["outcome"],
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
                registry=None,
            ),
            "staged",
            "failed",
        )

    async def start(self) -> None:
        """Resume whatever a previous run of the datacache left unfinished."""
        for staging in await self.store.unfinished_stagings():
            log.info("staging_resumed", job_id=staging["_id"], state=staging["state"])
            self._spawn(staging["_id"])

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stage(self, envelope: Envelope, command: DataStage) -> None:
        """Handle `data.stage`: record it (idempotently), then stage in the background."""
        assert envelope.tenant is not None
        inputs = [item.model_dump(mode="json") for item in command.inputs]
        await self.store.open_staging(command.job_id, envelope.tenant, envelope.actor, inputs)
        self._spawn(command.job_id)

    def _spawn(self, job_id: str) -> None:
        if job_id in self._tasks:
            return
        task = asyncio.create_task(self._run(job_id), name=f"staging-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))

    async def _run(self, job_id: str) -> None:
        staging = await self.store.get_staging(job_id)
        if staging is None:
            return
        with structlog.contextvars.bound_contextvars(job_id=job_id, tenant=staging["tenant"]):
            if staging["state"] == "staging":
                await self._stage_all(staging)
                staging = await self.store.get_staging(job_id)
                assert staging is not None
            if not staging.get("announced"):
                await self._announce(staging)

    async def _stage_all(self, staging: StagingDoc) -> None:
        job_id, tenant = staging["_id"], staging["tenant"]
        progress = Progress(job_id, _fields(staging), self.bus, self.settings.progress_interval_s)
        staged: list[Document] = []
        manifest: list[ManifestEntry] = []
        objects: set[str] = set()
        cached = 0
        item: InputSpec | None = None
        started = time.monotonic()
        try:
            for raw in staging["inputs"]:
                item = InputSpec.model_validate(raw)
                progress.input = item.name
                self.in_use.setdefault(job_id, set())
                source, hit = await self._input(tenant, job_id, item, progress)
                self.in_use[job_id].update(f["sha256"] for f in source["files"])
                cached += hit
                files = source["files"]
                objects.update(f["sha256"] for f in files)
                manifest.append({"name": item.name, "path": item.path, "files": files})
                staged.append(
                    StagedInput(
                        name=item.name,
                        path=item.path,
                        source=source["source"],
                        version=source.get("version"),
                        files=len(files),
                        bytes=source["bytes"],
                    ).model_dump(mode="json")
                )
        except Exception as exc:
            # Whatever went wrong, the job hears of it: a staging never hangs silently.
            assert item is not None
            if isinstance(exc, SourceError):
                reason = f"input {item.name}: {exc}"
                log.warning("staging_failed", reason=reason)
            else:
                reason = f"input {item.name}: internal error: {type(exc).__name__}: {exc}"
                log.exception("staging_crashed", input=item.name)
            await self.store.finish_staging(
                job_id, {"state": "failed", "reason": reason, "failed_source": item.source}
            )
            self.staging_seconds.labels("failed").observe(time.monotonic() - started)
            return
        finally:
            self.in_use.pop(job_id, None)
        await self.store.finish_staging(
            job_id,
            {
                "state": "staged",
                "staged": staged,
                "manifest": manifest,
                "objects": sorted(objects),
                "cached": cached,
            },
        )
        self.staging_seconds.labels("staged").observe(time.monotonic() - started)
        log.info("staging_done", inputs=len(staged), cached=cached, bytes=progress.bytes)

    async def _announce(self, staging: StagingDoc) -> None:
        job_id = staging["_id"]
        if staging["state"] == "failed":
            await self.bus.emit(
                "data.failed",
                DataFailed(
                    job_id=job_id, reason=staging["reason"], source=staging.get("failed_source")
                ),
                **_fields(staging),
            )
        elif staging["state"] == "staged":
            staged = [StagedInput.model_validate(item) for item in staging["staged"]]
            await self.bus.emit(
                "data.staged",
                DataStaged(job_id=job_id, inputs=staged, cached=staging.get("cached", 0)),
                **_fields(staging),
            )
        await self.store.mark_announced(job_id)

    async def _input(
        self, tenant: str, job_id: str, item: InputSpec, progress: Progress
    ) -> tuple[Document, bool]:
        """What the source holds for this input, from the cache or fetched; (doc, hit)."""
        source, ref = self.sources.open(tenant, item.source, self.http, item.transfer_syntax)
        canonical = source.canonical(ref)
        version = await with_retries(self.settings, canonical, lambda: source.version(ref))
        key = source_key(tenant, canonical, version)
        if (cached := await self._cached(key)) is not None:
            self.hits.inc()
            return cached, True
        if (shared := self._inflight.get(key)) is not None:
            self.hits.inc()
            return await asyncio.shield(shared), True
        self.misses.inc()
        future: asyncio.Future[Document] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            doc = await self._fetch(source, ref, canonical, version, tenant, job_id, progress)
            await self.store.save_source(key, doc)
            future.set_result(doc)
            return doc, False
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[key]

    async def _cached(self, key: str) -> Document | None:
        """The cached listing, if every object of it is still held and sound."""
        doc = await self.store.find_source(key)
        if doc is None:
            return None
        shas = sorted({f["sha256"] for f in doc["files"]})
        # A study is thousands of objects: they are looked up together, and their files
        # checked in one trip to a worker thread, not a query and a stat each.
        held = [obj for obj in await self.store.get_objects(shas) if not obj["quarantined"]]
        if len(held) < len(shas):
            return None
        if lost := await asyncio.to_thread(self._lost, held):
            # Marked, so that the fetch that follows replaces them in the catalog (kept,
            # a fresh copy would be dropped as a duplicate of a file that is gone).
            for obj in lost:
                await self.quarantine(obj["_id"], obj["blob"], "its file is gone from the cache")
            return None
        await self.store.touch(shas)
        return doc

    def _lost(self, objects: list[ObjectDoc]) -> list[ObjectDoc]:
        """Those of the objects whose blob file is not there (blocking)."""
        return [obj for obj in objects if not self.blobs.exists(obj["blob"])]

    async def _fetch(
        self,
        source: Source,
        ref: SourceRef,
        canonical: str,
        version: str | None,
        tenant: str,
        job_id: str,
        progress: Progress,
    ) -> Document:
        started = time.monotonic()
        attempts = 0

        async def one_try() -> CacheSink:
            nonlocal attempts
            attempts += 1
            sink = CacheSink(self.blobs, self.store, tenant, canonical, progress)
            try:
                async with self._slots:
                    await source.fetch(ref, sink)
            except SourceUnavailable:
                await progress.advance(-len(sink.files), -sink.bytes)
                raise
            finally:
                await sink.flush()  # what was stored is recorded, whole fetch or not
            return sink

        sink = await with_retries(self.settings, canonical, one_try)
        seconds = time.monotonic() - started
        self.fetched_bytes.inc(sink.bytes)
        await self.bus.emit(
            "data.fetched",
            DataFetched(
                job_id=job_id,
                source=canonical,
                version=version,
                files=len(sink.files),
                bytes=sink.bytes,
                seconds=round(seconds, 3),
                attempts=attempts,
            ),
            **progress.fields,
        )
        log.info(
            "source_fetched",
            source=canonical,
            files=len(sink.files),
            bytes=sink.bytes,
            seconds=round(seconds, 3),
            attempts=attempts,
        )
        return {
            "tenant": tenant,
            "source": canonical,
            "version": version,
            "files": sink.files,
            "bytes": sink.bytes,
            "fetched_at": time.time(),
        }


def _fields(staging: StagingDoc) -> Document:
    """Envelope fields of a staging's events: the job, its tenant, who submitted it."""
    return {
        "correlation_id": staging["_id"],
        "tenant": staging["tenant"],
        "actor": staging.get("actor"),
    }
