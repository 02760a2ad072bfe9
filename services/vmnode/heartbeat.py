"""The node's presence: `node.online` at start, `node.heartbeat` while alive, `node.offline`.

The scheduler places jobs by the capacity these carry and declares a node lost
when its heartbeats stop, so they run on their own timer, apart from any job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime

import structlog

from services.vmnode.settings import NodeSettings
from shared.bus import Bus
from shared.envelope import utcnow
from shared.messages.nodes import NodeStatus

log = structlog.get_logger("medhive.vmnode.heartbeat")


class Heartbeat:
    """Publishes the node's status on start, every `heartbeat_s`, and on stop."""

    def __init__(
        self,
        bus: Bus,
        settings: NodeSettings,
        running: Callable[[], list[str]],
        kinds: list[str],
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.running = running
        self.kinds = kinds
        self.started_at: datetime = utcnow()
        self._task: asyncio.Task[None] | None = None

    def status(self) -> NodeStatus:
        return NodeStatus(
            node_id=self.settings.node_id,
            cpus=self.settings.cpus,
            memory_mb=self.settings.memory_mb,
            running=self.running(),
            runtimes=list(self.kinds),
            heartbeat_s=self.settings.heartbeat_s,
            started_at=self.started_at,
        )

    async def start(self) -> None:
        self.started_at = utcnow()
        await self._emit("node.online")
        self._task = asyncio.create_task(self._beat(), name="heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._emit("node.offline")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)  # the period, not a wait for an event
            try:
                await self._emit("node.heartbeat")
            except Exception:
                # A missed beat is no reason to stop beating (the broker may be back soon).
                log.exception("heartbeat_failed")

    async def _emit(self, type_: str) -> None:
        await self.bus.emit(type_, self.status(), actor=self.settings.node_id)
