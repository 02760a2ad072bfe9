"""The scheduler's second line: a node that keeps beating but never stops a job.

A real node agent cannot be made to ignore a stop, so the test speaks the node's
side of the protocol itself: heartbeats as the service account, and a queue that
receives the node's commands and never answers them.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aio_pika
from aiohttp.test_utils import TestClient

from shared.bus import Bus
from shared.messages.catalog import COMMANDS
from shared.settings import AmqpSettings, MongoSettings
from tests.helpers import EventTap, bearer, event_tap, make_token
from tests.integration.scheduler.support import beat


async def test_a_job_its_node_does_not_stop_is_timed_out_by_the_scheduler(
    scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    bus = Bus(amqp_settings, "stuck-node@test")
    await bus.connect()
    commands = EventTap()
    connection = await aio_pika.connect(amqp_settings.url.get_secret_value())
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(COMMANDS, "node.stuck.#")
    await queue.consume(commands._on)
    beating = asyncio.create_task(beat(bus, "stuck"))
    auth = bearer(await make_token(mongo_settings, "cardiology"))
    try:
        async with event_tap(amqp_settings, ["job.timed_out"]) as ended:
            job: dict[str, Any] = await (
                await scheduler.post(
                    "/v1/jobs",
                    json={"name": "stuck", "image": "x", "walltime_s": 1},
                    headers=auth,
                )
            ).json()
            run = await commands.wait_for(lambda m: m["type"] == "node.run")
            assert run["payload"]["job_id"] == job["id"]
            cancel = await commands.wait_for(lambda m: m["type"] == "node.cancel")
            assert cancel["payload"]["reason"] == "walltime exceeded"
            event = await ended.wait_for(lambda m: m["correlation_id"] == job["id"])
        assert "did not confirm the stop" in event["payload"]["reason"]
        body = await (await scheduler.get(f"/v1/jobs/{job['id']}", headers=auth)).json()
        assert [h["state"] for h in body["history"]][-2:] == ["dispatched", "timed_out"]
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        await connection.close()
        await bus.close()
