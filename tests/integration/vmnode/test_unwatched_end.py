"""A run that started and ended while no agent watched it, through the real scheduler:
its job still goes dispatched, running, succeeded, each announced once."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import aiodocker
from aio_pika.abc import AbstractIncomingMessage
from aiohttp.test_utils import TestClient

from services.scheduler.app import create_app as create_scheduler
from services.scheduler.settings import SchedulerSettings
from services.vmnode.runtimes.docker import DockerRuntime
from services.vmnode.settings import NodeSettings
from shared.bus import Bus
from shared.envelope import Envelope, utcnow
from shared.messages.catalog import COMMANDS
from shared.messages.jobs import NodeRun
from shared.messages.nodes import NodeStatus
from shared.settings import AmqpSettings, MongoSettings
from shared.topology import declare_exchanges, declare_queue, node_queue
from tests.conftest import TEST_IMAGE
from tests.helpers import bearer, event_tap, eventually, make_token
from tests.integration.vmnode.conftest import containers_of, running_agent


async def test_a_run_that_ended_while_its_agent_was_down_is_announced_started_then_finished(
    settings: NodeSettings,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    db_prefix: str,
    docker: aiodocker.Docker,
    aiohttp_client: Any,
) -> None:
    scheduler: TestClient = await aiohttp_client(
        create_scheduler(SchedulerSettings(amqp=amqp_settings, mongo=mongo_settings,
                                           database=f"{db_prefix}scheduler"))
    )  # fmt: skip
    node = settings.node_id
    # The node's queue, as its agent declares it, and the node online, as it announced.
    connection = await aio_pika.connect(amqp_settings.url.get_secret_value())
    channel = await connection.channel()
    exchanges = await declare_exchanges(channel)
    queue = await declare_queue(
        channel,
        node_queue(node),
        [(COMMANDS, f"node.{node}.run"), (COMMANDS, f"node.{node}.cancel")],
        exchanges,
        amqp_settings.delivery_limit,
    )
    bus = Bus(amqp_settings, f"vmnode@{node}")
    await bus.connect()
    online = NodeStatus(node_id=node, cpus=2, memory_mb=2048, runtimes=["container"],
                        heartbeat_s=30, started_at=utcnow())  # fmt: skip
    await bus.emit("node.online", online)

    auth = bearer(await make_token(mongo_settings, "t1"))
    async with event_tap(amqp_settings, ["run.*", "job.*"]) as tap:
        job = {"name": "unwatched", "image": TEST_IMAGE, "command": ["true"]}
        job_id = (await (await scheduler.post("/v1/jobs", json=job, headers=auth)).json())["id"]
        # The agent took the command and started the container, then died before it
        # could announce the start: the command is still unacknowledged.
        taken: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()

        async def take(message: AbstractIncomingMessage) -> None:
            if not taken.done():
                taken.set_result(message)

        await queue.consume(take)
        delivery = await asyncio.wait_for(taken, 30)
        run = NodeRun.model_validate(Envelope.model_validate_json(delivery.body).payload)
        assert run.job_id == job_id
        runtime = DockerRuntime(settings)
        workload = await runtime.prepare(run)
        await runtime.start(workload)
        await runtime.wait(workload)  # and the container ended, unwatched
        await runtime.close()
        await channel.close()  # the dead agent's delivery goes back to the queue
        await connection.close()
        await bus.close()

        async with running_agent(settings):
            await tap.wait_for(lambda m: m["type"] == "job.succeeded")
            await eventually(lambda: _no_containers(docker, node))

    mine = [m for m in tap.messages if m.get("correlation_id") == job_id]
    once = {m["type"]: m for m in mine}
    for kind in ("run.started", "job.running", "run.finished", "job.succeeded"):
        assert len({m["id"] for m in mine if m["type"] == kind}) == 1, kind
    assert [m["type"] for m in mine if m["type"].startswith("job.")] == [
        "job.submitted", "job.queued", "job.dispatched", "job.running", "job.succeeded"
    ]  # fmt: skip
    started = once["run.started"]
    assert started["payload"]["workload_id"] == workload.id
    assert started["occurred_at"] == started["payload"]["started_at"]
    assert once["job.running"]["causation_id"] == started["id"]
    job_doc = await (await scheduler.get(f"/v1/jobs/{job_id}", headers=auth)).json()
    assert [h["state"] for h in job_doc["history"]][-2:] == ["running", "succeeded"]


async def _no_containers(docker: aiodocker.Docker, node: str) -> bool:
    return await containers_of(docker, node) == []
