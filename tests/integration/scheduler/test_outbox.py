"""The outbox relay publishes the messages of one change in their order; a command no
queue takes yet waits, with what follows it, for the relay's next try."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import aio_pika
from aiohttp.test_utils import TestClient

from services.scheduler.api import JOBS, STORE
from services.scheduler.documents import OutboxEntry
from services.scheduler.store import Change, outbox_entry
from shared.auth import Role
from shared.messages.catalog import COMMANDS
from shared.messages.jobs import JobEvent, JobSpec, JobState, NodeRun
from shared.service import BUS
from shared.settings import AmqpSettings, MongoSettings
from tests.helpers import bearer, event_tap, make_token

JOB = {"name": "outbox", "image": "medhive/busybox:1"}


async def _job(scheduler: TestClient, mongo_settings: MongoSettings) -> str:
    auth = bearer(await make_token(mongo_settings, "cardiology", Role.user))
    job = await (await scheduler.post("/v1/jobs", json=JOB, headers=auth)).json()
    return str(job["id"])


def _event(scheduler: TestClient, job_id: str, reason: str) -> OutboxEntry:
    event = JobEvent(job_id=job_id, state=JobState.queued, previous_state=JobState.submitted,
                     reason=reason, attempt=0)  # fmt: skip
    bus = scheduler.app[BUS]
    envelope = bus.envelope("job.queued", event, correlation_id=job_id, tenant="cardiology")
    return outbox_entry(envelope)


async def test_the_messages_of_one_change_arrive_in_their_order(
    scheduler: TestClient, mongo_settings: MongoSettings, amqp_settings: AmqpSettings
) -> None:
    job_id = await _job(scheduler, mongo_settings)
    entries = [_event(scheduler, job_id, f"step {i}") for i in range(40)]
    relay = scheduler.app[JOBS].relay
    async with event_tap(amqp_settings, ["job.queued"]) as tap:
        await relay.flush(job_id, entries)
        await tap.wait_for(lambda m: m["payload"]["reason"] == "step 39")
        reasons = [m["payload"]["reason"] for m in tap.messages if m["correlation_id"] == job_id]
    steps = [reason for reason in reasons if reason.startswith("step")]
    assert steps == [f"step {i}" for i in range(40)]
    assert relay.published(job_id) >= {entry["id"] for entry in entries}


async def test_a_command_no_queue_takes_waits_with_what_follows_it(
    scheduler: TestClient, mongo_settings: MongoSettings, amqp_settings: AmqpSettings
) -> None:
    """A node command whose node has no queue yet is kept, with the entries after it,
    and published by the relay's next try once the queue is there, in order; what went
    before it is published at once, and not again."""
    job_id = await _job(scheduler, mongo_settings)
    store, bus, relay = scheduler.app[STORE], scheduler.app[BUS], scheduler.app[JOBS].relay
    node_id = f"absent-{uuid.uuid4().hex[:8]}"
    run = NodeRun(job_id=job_id, attempt=1, tenant="cardiology",
                  spec=JobSpec.model_validate(JOB), deadline=datetime.now(UTC))  # fmt: skip
    command = outbox_entry(
        bus.envelope("node.run", run, correlation_id=job_id, tenant="cardiology"), node_id=node_id
    )
    before, after = _event(scheduler, job_id, "before"), _event(scheduler, job_id, "after")
    entries = [before, command, after]
    current = await store.current(job_id, fresh=True)
    assert current is not None
    written = await store.apply(current, Change({"note": "test"}, [], entries), set())
    assert written is not None  # stored with the change, as every outbox entry is

    async with event_tap(amqp_settings, ["job.queued"]) as tap:
        await relay.flush(job_id, entries)
        await tap.wait_for(lambda m: m["id"] == before["id"])
        assert before["id"] in relay.published(job_id)
        assert not {command["id"], after["id"]} & relay.published(job_id)

        connection = await aio_pika.connect(amqp_settings.url.get_secret_value())
        try:
            channel = await connection.channel()
            node_queue = await channel.declare_queue(exclusive=True)
            await node_queue.bind(COMMANDS, f"node.{node_id}.run")
            assert await relay.retry_stuck() == 1
            async with node_queue.iterator(timeout=10) as delivered:
                async for message in delivered:
                    await message.ack()
                    assert message.message_id == command["id"]
                    break
        finally:
            await connection.close()
        await tap.wait_for(lambda m: m["id"] == after["id"])
        assert {command["id"], after["id"]} <= relay.published(job_id)
        # Anything published again would arrive before a message published after it.
        marker = _event(scheduler, job_id, "marker")
        await relay.flush(job_id, [marker])
        await tap.wait_for(lambda m: m["id"] == marker["id"])
        mine = [m["id"] for m in tap.messages if m["id"] in (before["id"], after["id"])]
    assert mine == [before["id"], after["id"]]  # each once, in order
