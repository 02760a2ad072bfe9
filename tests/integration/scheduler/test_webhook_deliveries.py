"""Webhook deliveries against real receivers on loopback: signed, retried, given up,
audited, kept across a restart, and never sent where the SSRF rule forbids."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pymongo.asynchronous.database import AsyncDatabase

from services.audit.app import create_app as create_audit_app
from services.audit.settings import AuditSettings
from services.scheduler.app import create_app
from services.scheduler.deliveries import PENDING, DeliveryStore
from services.scheduler.delivery_worker import OutcomeSweep
from services.scheduler.settings import SchedulerSettings
from shared.envelope import utcnow
from shared.messages.jobs import JobEvent, JobState
from shared.messages.webhooks import WebhookDelivered
from shared.mongo import Document, connect
from shared.service import BUS
from shared.settings import AmqpSettings, MongoSettings
from shared.topology import SCHEDULER_WEBHOOKS
from tests.helpers import EventTap, bearer, connected_bus, event_tap, make_token
from tests.integration.audit.support import next_event
from tests.integration.scheduler.webhook_support import Receiver, job_life, quick, register


@contextlib.asynccontextmanager
async def receiving(*receivers: Receiver) -> AsyncIterator[None]:
    for receiver in receivers:
        await receiver.start()
    try:
        yield
    finally:
        for receiver in receivers:
            await receiver.stop()


@pytest.fixture
async def tap(amqp_settings: AmqpSettings) -> AsyncIterator[EventTap]:
    async with event_tap(amqp_settings, ["job.*", "webhook.*"]) as tap:
        yield tap


@pytest.fixture
def settings(scheduler_settings: SchedulerSettings) -> SchedulerSettings:
    return quick(scheduler_settings)


@pytest.fixture
async def hooks(settings: SchedulerSettings, aiohttp_client: Any) -> TestClient:
    """The scheduler on `settings` (webhooks retried within a second)."""
    client: TestClient = await aiohttp_client(create_app(settings))
    return client


@pytest.fixture
async def radiology(mongo_settings: MongoSettings) -> dict[str, str]:
    """The headers of a user of tenant radiology, whose webhooks the tests register."""
    return bearer(await make_token(mongo_settings, "radiology"))


def outcome_of(tap: EventTap, type_: str, delivery_id: str) -> Any:
    return lambda m: m["type"] == type_ and m["payload"]["delivery_id"] == delivery_id


async def test_every_job_event_arrives_signed_and_once_through_failures_and_a_restart(
    settings: SchedulerSettings, aiohttp_client: Any, radiology: dict[str, str], tap: EventTap
) -> None:
    receiver = Receiver(fail_first=3)
    await receiver.start()
    first: TestClient = await aiohttp_client(create_app(settings))
    receiver.secret = (await register(first, radiology, receiver.url))["secret"]

    events = [e for _ in range(2) for e in await job_life(first, radiology, tap)]
    await receiver.wait_for(lambda r: set(events) <= set(r.event_ids()))
    # Down across a restart: what happens meanwhile waits in the database.
    await receiver.stop()
    later = [e for _ in range(2) for e in await job_life(first, radiology, tap)]
    await tap.wait_for(lambda m: m["type"] == "webhook.failed" and m["causation_id"] in later)
    await first.close()
    second: TestClient = await aiohttp_client(create_app(settings))
    await receiver.start()
    try:
        await receiver.wait_for(lambda r: set(events + later) <= set(r.event_ids()))
    finally:
        await receiver.stop()

    assert receiver.unverified == []
    assert sorted(receiver.event_ids()) == sorted(events + later)  # one webhook-id per event
    assert [seen.status for seen in receiver.seen[:3]] == [500, 500, 500]
    assert {body["type"] for body in receiver.accepted.values()} == {
        "job.submitted", "job.queued", "job.cancelled"
    }  # fmt: skip
    body = next(iter(receiver.accepted.values()))
    assert body["data"]["tenant"] == "radiology"
    assert {"job_id", "state", "event_id"} <= set(body["data"])
    assert second.app is not first.app


async def test_a_delivery_never_accepted_is_given_up_and_the_audit_records_every_outcome(
    scheduler_settings: SchedulerSettings,
    aiohttp_client: Any,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    db_prefix: str,
    radiology: dict[str, str],
    tap: EventTap,
) -> None:
    audit_settings = AuditSettings(
        amqp=amqp_settings, mongo=mongo_settings, database=f"{db_prefix}audit"
    )
    audit: TestClient = await aiohttp_client(create_audit_app(audit_settings))
    hooks: TestClient = await aiohttp_client(
        create_app(quick(scheduler_settings, webhook_max_age_s=1.0))
    )
    flaky, broken = Receiver(fail_first=1), Receiver(status=503)
    async with receiving(flaky, broken):
        sent = {}
        for name, receiver in (("flaky", flaky), ("broken", broken)):
            webhook = await register(hooks, radiology, receiver.url)
            receiver.secret = webhook["secret"]
            queued = await hooks.post(f"/v1/webhooks/{webhook['id']}/test", headers=radiology)
            sent[name] = (await queued.json())["delivery_id"]
        delivered = await tap.wait_for(outcome_of(tap, "webhook.delivered", sent["flaky"]))
        given_up = await tap.wait_for(outcome_of(tap, "webhook.given_up", sent["broken"]))

    assert delivered["payload"]["attempt"] == 2
    assert delivered["payload"]["status_code"] == 200
    assert given_up["payload"]["status_code"] == 503
    assert given_up["payload"]["attempt"] == len(broken.seen) >= 2
    assert "not accepted within 1 s" in given_up["payload"]["reason"]
    failed = [m for m in tap.messages if m["type"] == "webhook.failed"]
    assert {m["payload"]["delivery_id"] for m in failed} == set(sent.values())
    assert all(m["tenant"] == "radiology" for m in [delivered, given_up, *failed])
    assert all("whsec_" not in str(m) for m in tap.messages)

    # The audit has each of them, the tenant's own user may read them there.
    outcomes = {m["id"] for m in [delivered, given_up, *failed]}
    reader = bearer(await make_token(mongo_settings, "radiology", name="auditor"))
    recorded = set()
    async with audit.get("/v1/events/stream?type=webhook.", headers=reader) as stream:
        while not outcomes <= recorded:
            recorded.add(_record_id(await next_event(stream)))


def _record_id(event: dict[str, Any]) -> str:
    return str(event["data"]["id"])


async def test_a_url_outside_the_rule_is_refused_and_never_contacted(
    scheduler_settings: SchedulerSettings,
    aiohttp_client: Any,
    radiology: dict[str, str],
    tap: EventTap,
) -> None:
    """Only 127.0.0.2 is allowed: the receiver on 127.0.0.1 never hears a thing, while the
    allowed one gets the job's events."""
    hooks: TestClient = await aiohttp_client(
        create_app(quick(scheduler_settings, webhook_allowed_hosts=["127.0.0.2"]))
    )
    refused, allowed = Receiver("127.0.0.1"), Receiver("127.0.0.2")
    async with receiving(refused, allowed):
        for url in (refused.url, refused.url.replace("http:", "https:")):
            response = await hooks.post(
                "/v1/webhooks", json={"url": url, "events": ["job.*"]}, headers=radiology
            )
            assert response.status == 422
        allowed.secret = (await register(hooks, radiology, allowed.url))["secret"]
        events = await job_life(hooks, radiology, tap)
        await allowed.wait_for(lambda r: set(events) <= set(r.event_ids()))
    assert refused.seen == []


async def test_the_rule_holds_at_delivery_for_the_addresses_dns_gives_then(
    scheduler_settings: SchedulerSettings,
    aiohttp_client: Any,
    radiology: dict[str, str],
    tap: EventTap,
) -> None:
    """A name registered while its address was allowed is not reached once it is not
    (as when DNS rebinds a public name to an internal address)."""
    receiver = Receiver()
    loopback = ["127.0.0.1", "::1"]
    before: TestClient = await aiohttp_client(
        create_app(quick(scheduler_settings, webhook_allowed_hosts=loopback))
    )
    named = receiver.url.replace("http://127.0.0.1", "https://localhost")
    webhook = await register(before, radiology, named)
    await before.close()
    after: TestClient = await aiohttp_client(
        create_app(quick(scheduler_settings, webhook_allowed_hosts=[]))
    )
    async with receiving(receiver):
        queued = await after.post(f"/v1/webhooks/{webhook['id']}/test", headers=radiology)
        delivery_id = (await queued.json())["delivery_id"]
        failed = await tap.wait_for(outcome_of(tap, "webhook.failed", delivery_id))
    assert failed["payload"]["error"] == (
        "refused: localhost resolves to 127.0.0.1 is a loopback address"
    )
    assert receiver.seen == []


async def test_a_redelivered_event_makes_no_second_delivery(
    settings: SchedulerSettings,
    hooks: TestClient,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    radiology: dict[str, str],
) -> None:
    receiver = Receiver()
    webhook = await register(hooks, radiology, receiver.url)
    receiver.secret = webhook["secret"]
    async with connected_bus(amqp_settings, "scheduler@test") as bus, receiving(receiver):
        # Messages of one job are handled in order: when the last is delivered, the
        # repeat of the first has been handled too.
        once, last = (
            bus.envelope(
                f"job.{state.value}",
                JobEvent(job_id="j-000000000000deadbeef", state=state),
                correlation_id="j-000000000000deadbeef",
                tenant="radiology",
            )
            for state in (JobState.queued, JobState.cancelled)
        )
        for envelope in (once, once, last):
            await bus.publish(envelope)
        await receiver.wait_for(lambda r: str(last.id) in r.event_ids())
    stored = await _deliveries(mongo_settings, settings, webhook["id"])
    assert sorted(d["event_id"] for d in stored) == sorted([str(once.id), str(last.id)])


async def _deliveries(
    mongo: MongoSettings, settings: SchedulerSettings, webhook_id: str
) -> list[Document]:
    client = connect(mongo)
    try:
        collection = client[settings.database]["webhook_deliveries"]
        return await collection.find({"webhook_id": webhook_id}).to_list()
    finally:
        await client.close()


async def test_a_claim_whose_sender_died_is_due_again_after_its_lease(
    database: AsyncDatabase[Document],
) -> None:
    store = DeliveryStore(database)
    await store.create_indexes()
    now = utcnow()
    await store.add([{"_id": "msg_1", "state": PENDING, "due_at": now, "announce": []}])

    claimed = await store.claim(now, lease_s=60)
    assert claimed is not None and claimed["_id"] == "msg_1"
    assert await store.claim(now + timedelta(seconds=59), lease_s=60) is None
    again = await store.claim(now + timedelta(seconds=61), lease_s=60)
    assert again is not None and again["lease"] != claimed["lease"]
    # The first sender's late outcome no longer counts: the claim is the second's.
    assert not await store.settle(claimed, {"attempts": 1}, {"id": "e", "at": now})
    assert await store.settle(again, {"attempts": 1}, {"id": "e", "at": now})


async def test_a_removed_webhook_gets_nothing_more(
    settings: SchedulerSettings,
    hooks: TestClient,
    mongo_settings: MongoSettings,
    radiology: dict[str, str],
    tap: EventTap,
) -> None:
    down = Receiver()  # never started: every try fails, and would go on for a day
    webhook = await register(hooks, radiology, down.url)
    queued = await hooks.post(f"/v1/webhooks/{webhook['id']}/test", headers=radiology)
    await tap.wait_for(outcome_of(tap, "webhook.failed", (await queued.json())["delivery_id"]))

    assert (await hooks.delete(f"/v1/webhooks/{webhook['id']}", headers=radiology)).status == 200
    left = await _deliveries(mongo_settings, settings, webhook["id"])
    assert [d for d in left if d["state"] == PENDING] == []


async def test_an_outcome_stored_but_not_published_before_a_crash_is_published_by_the_sweep(
    database: AsyncDatabase[Document], amqp_settings: AmqpSettings
) -> None:
    store = DeliveryStore(database)
    await store.create_indexes()
    long_ago = utcnow() - timedelta(days=30)
    await store.add([{"_id": "msg_1", "state": PENDING, "due_at": long_ago, "announce": []}])
    claimed = await store.claim(long_ago, lease_s=60)
    assert claimed is not None
    # The bus declares the exchanges the tap binds to.
    async with connected_bus(amqp_settings, "scheduler@test") as bus:
        async with event_tap(amqp_settings, ["webhook.*"]) as tap:
            outcome = WebhookDelivered(
                delivery_id="msg_1", webhook_id="wh-1", event_type="webhook.test",
                target="https://hooks.example.org:443", attempt=1, status_code=204,
                duration_ms=3,
            )  # fmt: skip
            envelope = bus.envelope("webhook.delivered", outcome, tenant="radiology")
            announcement = {"id": str(envelope.id), "body": envelope.model_dump_json().encode(),
                            "at": long_ago}  # fmt: skip
            fields = {"state": "delivered", "finished_at": long_ago}
            assert await store.settle(claimed, fields, announcement)  # ... and the crash

            await OutcomeSweep(store, bus).tick()
            await tap.wait_for(lambda m: m["id"] == str(envelope.id))
        assert await store.unannounced(utcnow()) == []
        await OutcomeSweep(store, bus).tick()  # announced, and ended long ago: dropped
        assert await store.collection.count_documents({}) == 0


async def test_only_the_job_events_of_tenants_with_a_webhook_reach_the_webhook_queue(
    hooks: TestClient, mongo_settings: MongoSettings, radiology: dict[str, str], tap: EventTap
) -> None:
    (queue,) = [c for c in hooks.app[BUS].consumers if c.queue_name == SCHEDULER_WEBHOOKS]
    cardiology = bearer(await make_token(mongo_settings, "cardiology"))
    first, second = Receiver(), Receiver()
    async with receiving(first, second):
        webhook = await register(hooks, radiology, first.url)
        first.secret = webhook["secret"]
        # Cardiology has none: its events come first, and are not even delivered here.
        await job_life(hooks, cardiology, tap)
        wanted = await job_life(hooks, radiology, tap)
        await first.wait_for(lambda r: set(wanted) <= set(r.event_ids()))
        assert queue.tally[("job.submitted", "ok")] == 1

        # The roles change: radiology's last webhook goes, cardiology gets one.
        assert (await hooks.delete(f"/v1/webhooks/{webhook['id']}", headers=radiology)).status
        second.secret = (await register(hooks, cardiology, second.url))["secret"]
        await job_life(hooks, radiology, tap)
        wanted = await job_life(hooks, cardiology, tap)
        await second.wait_for(lambda r: set(wanted) <= set(r.event_ids()))
        assert queue.tally[("job.submitted", "ok")] == 2
    assert first.unverified == second.unverified == []
