"""Builds the audit app: the shared service wiring, the recorder, the HTTP routes."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from services.audit.api import STREAM_SLOTS, StreamSlots, routes
from services.audit.metrics import RecorderCollector
from services.audit.recorder import NOTIFIER, Notifier, Recorder
from services.audit.settings import AuditSettings
from services.audit.store import STORE, AuditStore
from shared.http import TOKENS
from shared.identity import AmqpUsers
from shared.metrics import METRICS
from shared.server import CANCEL_ON_DISCONNECT
from shared.service import BUS, MONGO, create_service_app


def create_app(settings: AuditSettings) -> web.Application:
    """The audit app; does no I/O (the recorder starts with the app)."""
    app = create_service_app("audit", settings.amqp, settings.mongo)
    app[NOTIFIER] = Notifier()
    app[STREAM_SLOTS] = StreamSlots(settings.streams_per_token, settings.streams_total)
    app[CANCEL_ON_DISCONNECT] = True  # a stream gives its slot back when its client leaves

    async def recording(app: web.Application) -> AsyncIterator[None]:
        store = AuditStore(app[MONGO][settings.database])
        await store.ensure_indexes()
        app[STORE] = store
        services = settings.amqp.service_users(settings.trusted_users)
        recorder = Recorder(
            app[BUS],
            store,
            app[NOTIFIER],
            AmqpUsers(app[TOKENS].tokens.database, services),
            batch_size=settings.batch_size,
            batch_wait_s=settings.batch_wait_ms / 1000,
        )
        await recorder.start()
        app[METRICS].add(RecorderCollector(recorder), recorder.stored, recorder.ingest_lag)
        yield
        await recorder.stop()

    async def end_streams(app: web.Application) -> None:
        # Before the server waits for open requests: live streams return instead.
        app[NOTIFIER].close()

    app.cleanup_ctx.append(recording)
    app.on_shutdown.append(end_streams)
    app.add_routes(routes)
    return app
