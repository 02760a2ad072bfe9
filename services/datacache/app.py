"""Builds the datacache: catalog, encrypted blobs, sources, stagings, grants, HTTP API."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from services.datacache.api import BLOBS, DATA_BUS, GRANTS, QUARANTINE, STORE, routes
from services.datacache.blobs import BlobStore
from services.datacache.crypto import KeyProvider, LocalKeyProvider
from services.datacache.eviction import Evictor
from services.datacache.grants import GrantService
from services.datacache.handlers import COMMANDS, CommandHandlers
from services.datacache.metrics import SERVED_BYTES, CacheCollector, served_bytes
from services.datacache.outputs import ResultUploader
from services.datacache.quarantine import Quarantine
from services.datacache.settings import DatacacheSettings
from services.datacache.sources.registry import SourceDirectory
from services.datacache.sources.storescp import StorageReceiver
from services.datacache.staging import Stager
from services.datacache.store import CacheStore
from shared.consume import trusted_senders
from shared.http import TOKENS
from shared.lease import leadership
from shared.metrics import METRICS
from shared.service import BUS, MONGO, create_service_app

STAGER = web.AppKey("stager", Stager)
EVICTOR = web.AppKey("evictor", Evictor)


def load_keys(settings: DatacacheSettings) -> KeyProvider:
    """The master keys, from the key file or the environment; refusing to run without."""
    if settings.master_key_file is not None:
        return LocalKeyProvider.from_file(settings.master_key_file)
    if settings.master_key is not None:
        return LocalKeyProvider.from_env(settings.master_key.get_secret_value())
    raise RuntimeError(
        "the datacache needs a master key: set MEDHIVE_DATACACHE_MASTER_KEY_FILE "
        "(or MEDHIVE_DATACACHE_MASTER_KEY)"
    )


def storage_receiver(settings: DatacacheSettings) -> StorageReceiver | None:
    """The storage SCP that C-MOVE retrievals arrive at, listening, if one is configured."""
    if settings.dimse_listen is None:
        return None
    host, _, port = settings.dimse_listen.rpartition(":")
    receiver = StorageReceiver(host or "0.0.0.0", int(port))
    receiver.start()
    return receiver


def create_app(settings: DatacacheSettings) -> web.Application:
    """The datacache app. It reads its keys and its sources file here, so that a wrong
    one stops the service before it listens; connections open with the app."""
    app = create_service_app("datacache", settings.amqp, settings.mongo)
    app.add_routes(routes)
    app[SERVED_BYTES] = served_bytes()
    app[METRICS].add(app[SERVED_BYTES])
    keys = load_keys(settings)
    configured = SourceDirectory.from_file(settings.sources_file)

    async def core(app: web.Application) -> AsyncIterator[None]:
        receiver = storage_receiver(settings)
        sources = dataclasses.replace(configured, receiver=receiver)
        store = CacheStore(app[MONGO][settings.database])
        await store.create_indexes()
        blobs = BlobStore(settings.cache_dir, keys)
        blobs.cleanup_tmp()
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.fetch_timeout_s, sock_read=settings.fetch_timeout_s
        )
        async with aiohttp.ClientSession(timeout=timeout) as http:
            grants = GrantService(store, app[BUS])
            quarantine = Quarantine(blobs, store, grants, app[BUS])
            stager = Stager(store, blobs, sources, app[BUS], http, settings, quarantine)
            uploader = ResultUploader(store, blobs, sources, app[BUS], http, settings)
            evictor = Evictor(store, blobs, settings, lambda: set().union(*stager.in_use.values()))
            app[TOKENS].delegated = grants.delegated_principal
            app[STORE], app[BLOBS], app[GRANTS], app[DATA_BUS] = store, blobs, grants, app[BUS]
            app[QUARANTINE] = quarantine
            app[STAGER], app[EVICTOR] = stager, evictor
            app[METRICS].add(
                CacheCollector(evictor),
                stager.fetched_bytes,
                stager.hits,
                stager.misses,
                stager.staging_seconds,
            )

            await stager.start()
            await uploader.start()
            await evictor.start()
            consumer = await app[BUS].consume(
                COMMANDS,
                CommandHandlers(stager, grants, uploader),
                authorize=trusted_senders(settings.amqp.service_users(settings.trusted_users)),
            )
            yield
            await consumer.stop()
            await evictor.stop()
            await uploader.stop()
            await stager.stop()
            await blobs.emptied()  # what was deleted leaves no file behind
            if receiver is not None:
                await asyncio.to_thread(receiver.stop)

    # Only the datacache holding the lease acts (README, High availability).
    app.cleanup_ctx.extend([leadership("datacache", settings.database, settings), core])
    return app
