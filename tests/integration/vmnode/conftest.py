"""The node agent against the real broker and the real Docker engine.

Each test gets its own vhost (from tests/conftest.py) and its own node id; every
container labelled with that node id is removed afterwards, even when the test fails.
The test plays the scheduler: it publishes node commands on the bus and watches the
events the agent publishes on an exclusive queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import aio_pika
import aiodocker
import pytest
from aiohttp.test_utils import TestServer

from services.vmnode.app import create_app
from services.vmnode.settings import NodeSettings
from shared.bus import Bus
from shared.envelope import Envelope, utcnow
from shared.messages.catalog import EVENTS
from shared.messages.jobs import JobSpec, NodeCancel, NodeRun, Resources, run_command_id
from shared.settings import AmqpSettings
from shared.topology import declare_exchanges
from tests.conftest import TEST_IMAGE

#: A workload that runs until the test touches /tmp/go inside it (see `release`).
GATED = "while [ ! -e /tmp/go ]; do sleep 0.05; done; echo released"


class Events:
    """Every event the agent publishes, with waiting on the one a test needs."""

    def __init__(self) -> None:
        self.seen: list[Envelope] = []
        self._changed = asyncio.Condition()

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with self._changed:
            self.seen.append(Envelope.model_validate_json(message.body))
            self._changed.notify_all()

    def of(self, type_: str, job_id: str | None = None) -> list[Envelope]:
        return [
            e
            for e in self.seen
            if e.type == type_ and (job_id is None or e.payload.get("job_id") == job_id)
        ]

    async def wait_for(
        self,
        type_: str,
        job_id: str | None = None,
        where: Callable[[Envelope], bool] = lambda _: True,
        within_s: float = 30.0,
    ) -> Envelope:
        """The first event of `type_` (about `job_id`) that satisfies `where`."""
        async with asyncio.timeout(within_s), self._changed:
            while True:
                for event in self.of(type_, job_id):
                    if where(event):
                        return event
                await self._changed.wait()

    def finished(self, job_id: str) -> list[dict[str, Any]]:
        return [e.payload for e in self.of("run.finished", job_id)]

    def output(self, job_id: str, stream: str) -> dict[str, Any] | None:
        found = [e.payload for e in self.of("run.output", job_id) if e.payload["stream"] == stream]
        assert len(found) <= 1, found
        return found[0] if found else None


@pytest.fixture
def node_id() -> str:
    return f"node-{uuid.uuid4().hex[:10]}"


@pytest.fixture(autouse=True)
async def docker(node_id: str) -> AsyncIterator[aiodocker.Docker]:
    """The Docker engine; removes the test node's containers afterwards (every test)."""
    client = aiodocker.Docker()
    yield client
    for container in await containers_of(client, node_id):
        await container.delete(force=True)
    await client.close()


async def containers_of(
    client: aiodocker.Docker, node_id: str, job_id: str | None = None
) -> list[aiodocker.containers.DockerContainer]:
    """Containers (in any state) labelled with this node, and job if given."""
    wanted = [f"medhive.node={node_id}"] + ([f"medhive.job_id={job_id}"] if job_id else [])
    return await client.containers.list(all=True, filters=json.dumps({"label": wanted}))


@pytest.fixture
def settings(amqp_settings: AmqpSettings, node_id: str) -> NodeSettings:
    return NodeSettings(
        amqp=amqp_settings,
        node_id=node_id,
        cpus=2,
        memory_mb=2048,
        heartbeat_s=5.0,
        stop_grace_s=1.0,
        port=0,
    )


@pytest.fixture
async def events(amqp_settings: AmqpSettings) -> AsyncIterator[Events]:
    """Collects run.*, node.* and message.rejected from the moment the test starts."""
    collected = Events()
    connection = await aio_pika.connect(amqp_settings.url.get_secret_value())
    channel = await connection.channel()
    await declare_exchanges(channel)
    queue = await channel.declare_queue(exclusive=True)
    for key in ("run.*", "node.*", "message.rejected"):
        await queue.bind(EVENTS, key)
    await queue.consume(collected.on_message, no_ack=True)
    yield collected
    await connection.close()


@pytest.fixture
def scheduler(bus: Bus) -> Bus:
    """The test's bus (on the service account, which the agent trusts): the test plays
    the scheduler on it."""
    return bus


@contextlib.asynccontextmanager
async def running_agent(settings: NodeSettings) -> AsyncIterator[TestServer]:
    """The node agent's app, started and (gracefully) stopped like `web.run_app` does."""
    server = TestServer(create_app(settings))
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


def node_run(
    job_id: str,
    command: list[str] | None,
    *,
    image: str = TEST_IMAGE,
    memory_mb: int = 64,
    walltime_s: float = 60.0,
) -> NodeRun:
    spec = JobSpec(
        name=job_id,
        image=image,
        command=command,
        resources=Resources(cpus=0.5, memory_mb=memory_mb, pids=64),
    )
    return NodeRun(
        job_id=job_id,
        attempt=1,
        tenant="t1",
        spec=spec,
        deadline=utcnow() + timedelta(seconds=walltime_s),
    )


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def new_job() -> str:
    return f"job-{uuid.uuid4().hex[:8]}"


async def send_run(bus: Bus, node_id: str, run: NodeRun) -> Envelope:
    """`node.run` as the scheduler sends it: one id per attempt."""
    return await bus.emit(
        "node.run",
        run,
        node_id=node_id,
        id=run_command_id(run.job_id, run.attempt),
        correlation_id=run.job_id,
        tenant=run.tenant,
    )


async def send_cancel(bus: Bus, node_id: str, job_id: str, reason: str) -> Envelope:
    cancel = NodeCancel(job_id=job_id, attempt=1, reason=reason)
    return await bus.emit("node.cancel", cancel, node_id=node_id, correlation_id=job_id)


async def release(client: aiodocker.Docker, container_id: str) -> None:
    """Let a `GATED` workload finish."""
    run = await client.containers.container(container_id).exec(
        ["touch", "/tmp/go"], user="65534:65534"
    )
    await run.start(detach=True)


async def removed(client: aiodocker.Docker, container_id: str, within_s: float = 15.0) -> None:
    """Wait until the engine has removed the container (the agent removes after reporting)."""
    try:
        async with asyncio.timeout(within_s):
            await client.containers.container(container_id).wait(condition="removed")
    except aiodocker.DockerError as exc:
        if exc.status != 404:  # 404: already gone
            raise
