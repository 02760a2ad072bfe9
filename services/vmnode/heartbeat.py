"""The node's presence: `node.online` at start, `node.heartbeat` while alive, `node.offline`.

The scheduler places jobs by the capacity these carry and declares a node lost
when its heartbeats stop, so they run on their own timer, apart from any job.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

import structlog

from services.vmnode.settings import NodeSettings
from shared.bus import Bus
from shared.envelope import utcnow
from shared.messages.nodes import NodeStatus
from shared.tasks import PeriodicLoop

log = structlog.get_logger("medhive.vmnode.heartbeat")


class Heartbeat(PeriodicLoop):
    """Publishes the node's status on start, every `heartbeat_s`, and on stop (a missed
    beat is logged and the next one comes: the broker may be back soon)."""

    task_name = "heartbeat"

    def __init__(
        self,
        bus: Bus,
        settings: NodeSettings,
        running: Callable[[], list[str]],
        kinds: list[str],
        capacity: Callable[[], Awaitable[tuple[float, int] | None]] | None = None,
    ) -> None:
        super().__init__(settings.heartbeat_s)
        self.bus = bus
        self.settings = settings
        self.running = running
        self.kinds = kinds
        #: Where the capacity comes from when the engine knows it (a Swarm's nodes).
        self.capacity = capacity
        self.offered: tuple[float, int] = (settings.cpus, settings.memory_mb)
        self.started_at: datetime = utcnow()

    def status(self) -> NodeStatus:
        cpus, memory_mb = self.offered
        return NodeStatus(
            node_id=self.settings.node_id,
            cpus=cpus,
            memory_mb=memory_mb,
            running=self.running(),
            runtimes=list(self.kinds),
            heartbeat_s=self.settings.heartbeat_s,
            started_at=self.started_at,
        )

    async def start(self) -> None:
        self.started_at = utcnow()
        await self._emit("node.online")
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        await self._emit("node.offline")

    async def tick(self) -> None:
        await self._emit("node.heartbeat")

    async def _emit(self, type_: str) -> None:
        if self.capacity is not None and type_ != "node.offline":
            try:
                self.offered = await self.capacity() or self.offered
            except Exception as exc:  # the engine away: the last known capacity stands
                log.warning("capacity_unknown", reason=str(exc))
        await self.bus.emit(type_, self.status(), actor=self.settings.node_id)
