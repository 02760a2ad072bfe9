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


async def beat(bus: Bus, node_id: str) -> None:
    """A node that is online and beating, and never does what it is told (its commands
    go to whoever listens on its queue)."""
    status = NodeStatus(node_id=node_id, cpus=4, memory_mb=4096, runtimes=["container"],
                        heartbeat_s=0.3, started_at=utcnow())  # fmt: skip
    await bus.emit("node.online", status)
    while True:
        await asyncio.sleep(0.3)  # the heartbeat period of the pretended node
        await bus.emit("node.heartbeat", status)
