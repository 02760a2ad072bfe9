"""Builds the scheduler: job API, command and report consumers, placement, watchdog,
webhooks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from services.scheduler.api import (
    DATACACHE_URL,
    HTTP,
    JOBS,
    NODES,
    OUTPUT,
    PLACER,
    STORE,
    TENANTS,
    routes,
)
from services.scheduler.console import add_console
from services.scheduler.handlers import (
    COMMANDS,
    REPORTS,
    CommandHandlers,
    ReportHandlers,
    integrators,
)
from services.scheduler.jobs import JobService
from services.scheduler.metrics import JobFlow, SchedulerCollector
from services.scheduler.nodes import NodeStore
from services.scheduler.outbox import OutboxRelay
from services.scheduler.output import OutputStore
from services.scheduler.placement import Placer
from services.scheduler.settings import SchedulerSettings
from services.scheduler.store import JobStore
from services.scheduler.tenants import Admission, TenantBook
from services.scheduler.watchdog import Watchdog
from services.scheduler.webhook_service import webhook_context
from shared.consume import trusted_senders
from shared.http import TOKENS
from shared.identity import AmqpUsers
from shared.lease import leadership
from shared.metrics import METRICS
from shared.service import BUS, MONGO, create_service_app


def create_app(settings: SchedulerSettings) -> web.Application:
    app = create_service_app("scheduler", settings.amqp, settings.mongo)
    app.add_routes(routes)
    add_console(app, settings.audit_url)
    app[DATACACHE_URL] = settings.datacache_url.rstrip("/")

    async def http(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            app[HTTP] = session
            yield

    async def core(app: web.Application) -> AsyncIterator[None]:
        db = app[MONGO][settings.database]
        store, nodes, output = JobStore(db), NodeStore(db), OutputStore(db)
        await store.create_indexes()
        await output.create_indexes()
        book = TenantBook(
            db,
            settings.fair_share_half_life_s,
            settings.memory_mb_per_cpu,
        )
        await book.load()
        placer = Placer(store, nodes, settings.node_timeout_s, book)
        relay = OutboxRelay(store, app[BUS])
        jobs = JobService(store, app[BUS], relay, placer.wake, settings.upload_grace_s)
        placer.jobs = jobs
        jobs.place_at_once, jobs.let_go = placer.place_at_once, placer.view.let_go
        jobs.admission = Admission(book, lambda tenant: len(placer.view.unplaced.get(tenant, ())))
        app[STORE], app[PLACER], app[JOBS], app[TENANTS] = store, placer, jobs, book
        app[NODES], app[OUTPUT] = nodes, output
        placer.view.moves.append(JobFlow(app[METRICS].registry).moved)
        app[METRICS].add(SchedulerCollector(placer, nodes), placer.pass_seconds)
        watchdog = Watchdog(
            store, nodes, jobs, placer.view, app[BUS], settings.watchdog_interval_s,
            settings.walltime_grace_s, settings.node_timeout_s,
        )  # fmt: skip
        await relay.start()
        await placer.start()
        await watchdog.start()
        await book.start()
        yield
        await book.stop()
        await watchdog.stop()
        await placer.stop()
        await relay.stop()

    async def consumers(app: web.Application) -> AsyncIterator[None]:
        bus, jobs = app[BUS], app[JOBS]
        commands = CommandHandlers(jobs, bus)
        reports = ReportHandlers(
            jobs, app[NODES], app[OUTPUT], settings.log_limit_bytes, app[PLACER].wake
        )
        service_users = settings.amqp.service_users(settings.trusted_users)
        # Integrators' users live beside the API tokens, in the identity database.
        amqp_users = AmqpUsers(app[TOKENS].tokens.database, service_users)
        await amqp_users.seed(settings.amqp_tenants)
        command_consumer = await bus.consume(COMMANDS, commands, authorize=integrators(amqp_users))
        report_consumer = await bus.consume(
            REPORTS, reports, authorize=trusted_senders(service_users)
        )
        yield
        await command_consumer.stop()
        await report_consumer.stop()

    # Only the scheduler holding the lease acts (README, High availability).
    app.cleanup_ctx.extend(
        [http, leadership("scheduler", settings.database, settings), core, consumers]
    )
    app.cleanup_ctx.append(webhook_context(settings))
    return app
