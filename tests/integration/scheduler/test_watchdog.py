"""The scheduler's second line: a node that keeps beating but never stops a job.

A real node agent cannot be made to ignore a stop, so the test speaks the node's
side of the protocol itself: heartbeats as the service account, and a queue that
receives the node's commands and never answers them.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp.test_utils import TestClient

from shared.messages.catalog import COMMANDS
from shared.settings import AmqpSettings, MongoSettings
from tests.helpers import bearer, connected_bus, event_tap, make_token
from tests.integration.scheduler.support import beat


async def test_a_job_its_node_does_not_stop_is_timed_out_by_the_scheduler(
    scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "cardiology"))
    async with (
        connected_bus(amqp_settings, "stuck-node@test") as bus,
        event_tap(amqp_settings, ["node.stuck.#"], exchange=COMMANDS) as commands,
        event_tap(amqp_settings, ["job.timed_out"]) as ended,
    ):
        beating = asyncio.create_task(beat(bus, "stuck"))
        try:
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
            body = await (await scheduler.get(f"/v1/jobs/{job['id']}", headers=auth)).json()
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
    assert "did not confirm the stop" in event["payload"]["reason"]
    assert [h["state"] for h in body["history"]][-2:] == ["dispatched", "timed_out"]
