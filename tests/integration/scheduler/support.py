"""The other services' side, played by the scheduler's integration tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from shared.bus import Bus
from shared.envelope import utcnow
from shared.messages.catalog import COMMANDS
from shared.messages.nodes import NodeStatus
from shared.settings import AmqpSettings
from tests.helpers import EventTap, connected_bus, event_tap


@contextlib.asynccontextmanager
async def pretend(
    amqp: AmqpSettings, runtimes: tuple[str, ...] = ("container",)
) -> AsyncIterator[tuple[Bus, EventTap]]:
    """The datacache's and node n1's side: a bus to report on, and their command queue."""
    async with (
        connected_bus(amqp, "pretend@test") as bus,
        event_tap(amqp, ["data.#", "node.n1.#"], exchange=COMMANDS) as commands,
    ):
        status = NodeStatus(
            node_id="n1",
            cpus=4,
            memory_mb=4096,
            runtimes=list(runtimes),
            heartbeat_s=30,
            started_at=utcnow(),
        )
        await bus.emit("node.online", status)
        yield bus, commands


@contextlib.asynccontextmanager
async def beating_node(amqp: AmqpSettings, node_id: str) -> AsyncIterator[EventTap]:
    """A node that is online and beating, and never does what it is told: its commands
    go to the tap this yields, where nothing answers them. It falls silent on leaving."""
    async with (
        connected_bus(amqp, f"{node_id}-node@test") as bus,
        event_tap(amqp, [f"node.{node_id}.#"], exchange=COMMANDS) as commands,
    ):
        beating = asyncio.create_task(_beat(bus, node_id))
        try:
            yield commands
        finally:
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)


async def _beat(bus: Bus, node_id: str) -> None:
    status = NodeStatus(node_id=node_id, cpus=4, memory_mb=4096, runtimes=["container"],
                        heartbeat_s=0.3, started_at=utcnow())  # fmt: skip
    await bus.emit("node.online", status)
    while True:
        await asyncio.sleep(0.3)  # the heartbeat period of the pretended node
        await bus.emit("node.heartbeat", status)
