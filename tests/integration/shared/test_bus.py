"""The bus against a real RabbitMQ: confirms, ordering, and dead-lettering with reasons."""

from __future__ import annotations

import asyncio
import json

import aio_pika

from shared.bus import Bus
from shared.consume import Incoming
from shared.handlers import HandlerTable, on
from shared.messages.catalog import COMMANDS, EVENTS
from shared.messages.jobs import JobCancel
from shared.settings import AmqpSettings
from shared.topology import DEAD_LETTER_QUEUE


async def _get(
    queue: aio_pika.abc.AbstractQueue, within: float = 10.0
) -> aio_pika.abc.AbstractIncomingMessage:
    async with queue.iterator(timeout=within) as it:
        async for message in it:
            await message.ack()
            return message
    raise AssertionError("no message")


async def test_handled_in_order_per_job_and_invalid_messages_dead_lettered(
    amqp_settings: AmqpSettings,
) -> None:
    bus = Bus(amqp_settings, "test@here")
    await bus.connect()
    seen: list[str] = []
    done, after = asyncio.Event(), asyncio.Event()

    class Cancels:
        async def on_cancel(self, msg: Incoming[JobCancel]) -> None:
            if msg.payload.reason.isdigit():
                # Earlier messages take longer: handled side by side, they would end in
                # reverse order; a job's messages must be handled one after another.
                await asyncio.sleep(0.002 * (20 - int(msg.payload.reason)))
            seen.append(msg.payload.reason)
            if len(seen) == 20:
                done.set()
            if msg.payload.reason == "after":
                after.set()

    table = HandlerTable("test.commands", (on("job.cancel", JobCancel, Cancels.on_cancel),))
    await bus.consume(table, Cancels())
    channel = await bus.connection.channel()
    rejected = await channel.declare_queue(exclusive=True)
    await rejected.bind(EVENTS, "message.rejected")
    dead = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)

    for i in range(20):
        await bus.emit("job.cancel", JobCancel(job_id="j1", reason=str(i)), correlation_id="j1")
    await asyncio.wait_for(done.wait(), 10)
    assert seen == [str(i) for i in range(20)]

    exchange = await channel.get_exchange(COMMANDS)
    await exchange.publish(aio_pika.Message(b"{not json", message_id="m-bad"), "job.cancel")
    event = await _get(rejected)
    body = json.loads(event.body)
    assert body["payload"]["message_id"] == "m-bad"
    assert "not a medhive envelope" in body["payload"]["reason"]
    letter = await _get(dead)
    assert letter.body == b"{not json"
    assert "not a medhive envelope" in str(letter.headers["x-medhive-reason"])

    # The consumer is still consuming after the rejection.
    await bus.emit("job.cancel", JobCancel(job_id="j2", reason="after"), correlation_id="j2")
    await asyncio.wait_for(after.wait(), 10)
    await bus.close()


async def test_a_command_no_queue_can_receive_raises_instead_of_vanishing(
    amqp_settings: AmqpSettings,
) -> None:
    from datetime import UTC, datetime

    import pytest

    from shared.bus import Unroutable
    from shared.messages.jobs import JobSpec, NodeRun
    from shared.messages.nodes import RunOutput

    bus = Bus(amqp_settings, "test@here")
    await bus.connect()
    run = NodeRun(job_id="j", attempt=1, tenant="t", spec=JobSpec(name="n", image="i"),
                  deadline=datetime.now(UTC))  # fmt: skip
    with pytest.raises(Unroutable, match=r"node\.nowhere\.run"):
        await bus.emit("node.run", run, node_id="nowhere")
    # An event nobody listens to is fine: facts may have no audience.
    await bus.emit("run.output", RunOutput(job_id="j", attempt=1, node_id="n", stream="stdout",
                                           data="x"))  # fmt: skip
    await bus.close()


async def test_a_bug_in_publishing_is_raised_at_once_not_retried(
    amqp_settings: AmqpSettings,
) -> None:
    """A `RuntimeError` that is not the channel's state is a bug: retrying it for a
    minute would only hide it."""
    import pytest

    bus = Bus(amqp_settings, "test@here")
    await bus.connect()
    calls = 0

    async def broken(*args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug")

    bus._exchanges[COMMANDS].publish = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a bug"):
        await asyncio.wait_for(bus.emit("job.cancel", JobCancel(job_id="j", reason="r")), 5)
    assert calls == 1
    await bus.close()
