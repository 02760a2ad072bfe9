"""The recorder against real RabbitMQ and MongoDB: everything stored, each message once."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import aio_pika
import pytest

from services.audit.recorder import Recorder
from services.audit.settings import AuditSettings
from services.audit.store import AuditStore
from shared.auth import Role
from shared.bus import Bus
from shared.envelope import utcnow
from shared.messages.catalog import COMMANDS
from shared.messages.jobs import JobCancel, JobEvent, JobSpec, JobState, JobSubmit, NodeRun
from shared.settings import AmqpSettings
from shared.topology import AUDIT_ALL
from tests.integration.audit.conftest import StartApp
from tests.integration.audit.support import auth, record_of, stored


async def _queued(bus: Bus, n: int, tenant: str = "t1") -> str:
    job = f"job-{n}"
    event = JobEvent(job_id=job, state=JobState.queued)
    envelope = await bus.emit("job.queued", event, correlation_id=job, tenant=tenant)
    return str(envelope.id)


async def _flow(bus: Bus, numbers: range, size: int = 20) -> list[str]:
    """Publish events concurrently, `size` at a time; their ids in order."""
    ids: list[str] = []
    for start in range(numbers.start, numbers.stop, size):
        batch = range(start, min(start + size, numbers.stop))
        ids += await asyncio.gather(*(_queued(bus, n) for n in batch))
    return ids


def _assert_gapless(docs: list[dict[str, Any]]) -> None:
    assert [doc["seq"] for doc in docs] == list(range(1, len(docs) + 1))


async def test_every_command_event_and_undecodable_body_is_stored_once_in_gapless_seq(
    start_app: StartApp, bus: Bus, records: Any
) -> None:
    await start_app()
    spec = JobSpec(name="scan", image="medhive/busybox:1")
    ids = [await _queued(bus, n) for n in range(3)]
    submit = await bus.emit("job.submit", JobSubmit(spec=spec), tenant="t1", actor="alice")
    cancel = await bus.emit("job.cancel", JobCancel(job_id="job-0"), correlation_id="job-0")
    run = NodeRun(job_id="job-1", attempt=1, tenant="t1", spec=spec, deadline=utcnow())
    node_run = await bus.emit("node.run", run, node_id="n1", correlation_id="job-1")
    ids += [str(submit.id), str(cancel.id), str(node_run.id)]
    # A publisher that lost the confirm sends the same message again.
    await bus.publish(cancel)
    channel = await bus.connection.channel(publisher_confirms=True)
    commands = await channel.get_exchange(COMMANDS)
    await commands.publish(aio_pika.Message(b"{not json", message_id="bad-1"), "job.submit")
    await commands.publish(aio_pika.Message(b"\xff\xfe binary", message_id="bad-2"), "job.x")
    ids += ["bad-1", "bad-2"]
    # Published last: once it is stored, everything before it has been handled.
    ids.append(await _queued(bus, 99))

    await record_of(records, ids[-1])
    docs = await stored(records, len(ids))
    assert sorted(doc["_id"] for doc in docs) == sorted(ids)
    _assert_gapless(docs)
    by_id = {doc["_id"]: doc for doc in docs}
    queued = by_id[ids[0]]
    assert queued["valid"] is True
    assert (queued["type"], queued["tenant"], queued["job_id"]) == ("job.queued", "t1", "job-0")
    assert (queued["exchange"], queued["routing_key"]) == ("medhive.tenants", "t1.job.queued")
    assert queued["user_id"] == "medhive"
    assert queued["envelope"]["payload"]["state"] == "queued"
    assert "raw" not in queued
    assert by_id[str(node_run.id)]["routing_key"] == "node.n1.run"
    assert by_id[str(submit.id)]["actor"] == "alice"
    bad = by_id["bad-1"]
    assert (bad["valid"], bad["envelope"], bad["raw"]) == (False, None, "{not json")
    assert bad["tenant"] is None
    assert "not a medhive envelope" in bad["error"]
    assert by_id["bad-2"]["raw"] == "\ufffd\ufffd binary"


async def test_a_different_body_that_reuses_a_stored_id_is_stored_too(
    start_app: StartApp, bus: Bus, records: Any
) -> None:
    await start_app()
    event = JobEvent(job_id="j1", state=JobState.queued)
    envelope = await bus.emit("job.queued", event, correlation_id="j1", tenant="t1")
    forged = envelope.model_copy(update={"tenant": "t2"})
    await bus.publish(forged)
    digest = hashlib.sha256(forged.model_dump_json().encode()).hexdigest()
    docs = await stored(records, 2)
    assert [doc["_id"] for doc in docs] == [str(envelope.id), f"{envelope.id}~{digest}"]
    assert [doc["tenant"] for doc in docs] == ["t1", "t2"]


async def test_first_deliveries_are_stored_without_reading_the_store(
    start_app: StartApp, bus: Bus, records: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is written as if new; the stored records are looked up only for a batch
    that repeats one (here a message the publisher sends again)."""
    looked_up: list[set[str]] = []
    digests = AuditStore.digests

    async def counted(self: AuditStore, ids: Any) -> dict[str, str]:
        looked_up.append(set(ids))
        return await digests(self, ids)

    monkeypatch.setattr(AuditStore, "digests", counted)
    await start_app()
    ids = await _flow(bus, range(60), size=7)
    await stored(records, 60)
    assert looked_up == []
    again = JobEvent(job_id="job-0", state=JobState.queued)
    envelope = await bus.emit("job.queued", again, correlation_id="job-0", tenant="t1")
    await record_of(records, str(envelope.id))
    await bus.publish(envelope)  # a publisher that lost the confirm sends it again
    ids.append(str(envelope.id))
    ids.append(await _queued(bus, 99))  # published last: the repeat was handled before
    await record_of(records, ids[-1])
    docs = await stored(records, 62)
    assert sorted(doc["_id"] for doc in docs) == sorted(ids)
    _assert_gapless(docs)
    assert any(str(envelope.id) in asked for asked in looked_up)


async def test_restart_in_the_middle_of_a_flow_loses_nothing_and_doubles_nothing(
    start_app: StartApp, bus: Bus, records: Any, token: Any, audit_settings: AuditSettings
) -> None:
    audit_settings.batch_size = 16  # many small batches: the stop falls between them
    first = await start_app()
    publishing = asyncio.create_task(_flow(bus, range(400)))
    await stored(records, 40)
    await first.close()
    second = await start_app()
    ids = await publishing

    await record_of(records, ids[-1])
    docs = await stored(records, len(ids))
    assert sorted(doc["_id"] for doc in docs) == sorted(ids)
    _assert_gapless(docs)
    operator = auth(await token("ops", Role.operator))
    verdict = await (await second.get("/v1/audit/verify", headers=operator)).json()
    assert (verdict["ok"], verdict["records"]) == (True, 400)


async def test_every_stored_delivery_is_acknowledged(
    start_app: StartApp, bus: Bus, records: Any, amqp_settings: AmqpSettings
) -> None:
    """Batches are acknowledged with one frame each: none may be left out."""
    app = await start_app()
    await _flow(bus, range(120), size=7)
    await stored(records, 120)
    await app.close()  # whatever was not acknowledged goes back to the queue
    connection = await aio_pika.connect(amqp_settings.url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(AUDIT_ALL, passive=True)
        assert queue.declaration_result.message_count == 0


async def test_a_crash_between_storing_and_acknowledging_stores_nothing_twice(
    start_app: StartApp, bus: Bus, records: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def crash_before_ack(self: Recorder, batch: Any, *, ack: bool) -> None:
        """The process dies after the insert: nothing is acknowledged."""

    monkeypatch.setattr(Recorder, "_settle", crash_before_ack)
    first = await start_app()
    ids = await _flow(bus, range(100))
    await stored(records, 100)
    await first.close()  # every delivery goes back to the queue with the channel
    monkeypatch.undo()

    await start_app()
    ids.append(await _queued(bus, 100))
    await record_of(records, ids[-1])
    docs = await stored(records, 101)
    assert sorted(doc["_id"] for doc in docs) == sorted(ids)
    _assert_gapless(docs)
