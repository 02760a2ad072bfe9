"""Wires the scheduler's webhooks: the registered endpoints, the consumer that turns
its tenants' job events into deliveries, the sender and its sweep."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from aiohttp.resolver import ThreadedResolver

from services.scheduler.deliveries import DELIVERIES, Deliveries, DeliveryStore
from services.scheduler.delivery_worker import (
    MAX_IN_FLIGHT,
    DeliveryWorker,
    OutcomeSweep,
    RetryPolicy,
)
from services.scheduler.egress import AllowList, Guard
from services.scheduler.handlers import WEBHOOK_EVENTS
from services.scheduler.settings import SchedulerSettings
from services.scheduler.webhooks import WEBHOOKS, SecretBox, Webhooks
from shared.consume import trusted_senders
from shared.service import BUS, MONGO


def routes_of(tenant: str) -> list[tuple[str, str]]:
    """The bindings that bring a tenant's job events to the webhook queue. Only tenants
    with a webhook are bound, so the jobs of the others cost no delivery and no query."""
    return WEBHOOK_EVENTS.bindings(tenants=[tenant])


def webhook_context(
    settings: SchedulerSettings,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The app's cleanup context of webhooks (after the job consumers: stops first)."""

    async def webhooks(app: web.Application) -> AsyncIterator[None]:
        db, bus = app[MONGO][settings.database], app[BUS]
        guard = Guard(AllowList.parse(settings.webhook_allowed_hosts), ThreadedResolver())
        box = SecretBox.from_setting(settings.webhook_secret_key)
        endpoints = Webhooks(db, guard, box, settings.webhook_max_per_tenant)
        store = DeliveryStore(db)
        await endpoints.create_indexes()
        await store.create_indexes()
        policy = RetryPolicy(
            settings.webhook_first_retry_s,
            settings.webhook_max_retry_s,
            settings.webhook_max_age_s,
            settings.webhook_timeout_s,
        )
        connector = aiohttp.TCPConnector(resolver=guard.resolver(), limit=MAX_IN_FLIGHT)
        timeout = aiohttp.ClientTimeout(total=policy.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            sender = DeliveryWorker(store, endpoints, guard, bus, session, policy)
            deliveries = Deliveries(store, endpoints)
            deliveries.queued = sender.wake
            app[WEBHOOKS], app[DELIVERIES] = endpoints, deliveries
            sweep = OutcomeSweep(store, bus)
            await sweep.start()
            await sender.start()
            consumer = await bus.consume(
                WEBHOOK_EVENTS,
                deliveries,
                bindings=WEBHOOK_EVENTS.bindings(tenants=await endpoints.tenants()),
                authorize=trusted_senders(settings.amqp.service_users(settings.trusted_users)),
            )
            endpoints.routed = lambda tenant: consumer.bind(routes_of(tenant))
            endpoints.unrouted = lambda tenant: consumer.unbind(routes_of(tenant))
            yield
            await consumer.stop()
            await sender.stop()
            await sweep.stop()

    return webhooks
