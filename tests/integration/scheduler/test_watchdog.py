"""The scheduler's second line: a node that keeps beating but never stops a job, and a
node that falls silent while the scheduler cannot hear.

A real node agent cannot be made to ignore a stop, so the test speaks the node's
side of the protocol itself: heartbeats as the service account, and a queue that
receives the node's commands and never answers them.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from datetime import datetime, timedelta
from typing import Any

from aiohttp.test_utils import TestClient

from services.scheduler.app import create_app
from services.scheduler.settings import SchedulerSettings
from shared.envelope import utcnow
from shared.service import BUS
from shared.settings import AmqpSettings, MongoSettings
from tests.conftest import rabbit_api
from tests.helpers import bearer, event_tap, eventually, make_token
from tests.integration.scheduler.support import beating_node


async def test_a_job_its_node_does_not_stop_is_timed_out_by_the_scheduler(
    scheduler: TestClient, amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "cardiology"))
    async with (
        event_tap(amqp_settings, ["job.timed_out"]) as ended,
        beating_node(amqp_settings, "stuck") as commands,
    ):
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
    assert "did not confirm the stop" in event["payload"]["reason"]
    assert [h["state"] for h in body["history"]][-2:] == ["dispatched", "timed_out"]


def _connections(amqp: AmqpSettings, named: str) -> list[str]:
    """The connections of the test's vhost whose name starts with `named` (listed once
    the broker's statistics show them)."""
    vhost = urllib.parse.quote(amqp.url.get_secret_value().rsplit("/", 1)[1], safe="")
    listed = rabbit_api("GET", f"/vhosts/{vhost}/connections")
    assert isinstance(listed, list)
    return [c["name"] for c in listed
            if c["client_properties"].get("connection_name", "").startswith(named)]  # fmt: skip


def _drop(connection: str) -> None:
    """Close a connection broker side, as a broker restart does."""
    rabbit_api("DELETE", f"/connections/{urllib.parse.quote(connection, safe='')}")


async def test_a_node_is_lost_only_for_silence_the_scheduler_could_hear(
    scheduler_settings: SchedulerSettings,
    aiohttp_client: Any,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
) -> None:
    """Heartbeats sent while the scheduler's link to the broker is down never reach it:
    that silence is the scheduler's own. A node is lost only after a whole timeout of
    silence heard with the link up (a broker restart used to fail the jobs of nodes that
    were alive all along)."""
    timeout = timedelta(seconds=2)
    settings = scheduler_settings.model_copy(update={"node_timeout_s": timeout.total_seconds()})
    scheduler: TestClient = await aiohttp_client(create_app(settings))
    bus = scheduler.app[BUS]
    auth = bearer(await make_token(mongo_settings, "cardiology"))
    async with event_tap(amqp_settings, ["job.#"]) as events:
        async with beating_node(amqp_settings, "quiet") as commands:
            job: dict[str, Any] = await (
                await scheduler.post("/v1/jobs", json={"name": "q", "image": "x"}, headers=auth)
            ).json()
            await commands.wait_for(lambda m: m["type"] == "node.run")

            async def listed() -> list[str]:
                return await asyncio.to_thread(_connections, amqp_settings, "scheduler")

            [link] = await eventually(listed)
        # The node falls silent as the scheduler's link drops (aio-pika reconnects).
        deaf_from = utcnow()
        await asyncio.to_thread(_drop, link)

        async def heard_again() -> datetime | None:
            since = bus.hearing_since
            return since if since is not None and since > deaf_from else None

        heard_from = await eventually(heard_again)
        lost = await events.wait_for(
            lambda m: (
                m["correlation_id"] == job["id"]
                and "heartbeat" in (m["payload"].get("reason") or "")
            ),
            within=30,
        )
    assert datetime.fromisoformat(lost["occurred_at"]) >= heard_from + timeout
