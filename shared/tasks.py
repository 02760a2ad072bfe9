"""A service's long-running loops: started with the app, cancelled when it stops."""

from __future__ import annotations

import asyncio

import structlog

log = structlog.get_logger("medhive.tasks")


class BackgroundLoop:
    """Runs `run()` as one named task between `start()` and `stop()`."""

    task_name = "loop"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class PeriodicLoop(BackgroundLoop):
    """Runs `tick()` every `period_s`: at once and then after each period when
    `first_at_once`, else first after one period.

    A periodic task is a safety net or a clock (a sweep, a watchdog, a heartbeat): one
    tick that fails (the database or the broker away for a moment) is logged as
    `<task_name>_failed` and the next comes as usual; the loop never ends on its own.
    """

    first_at_once = False

    def __init__(self, period_s: float) -> None:
        super().__init__()
        self.period_s = period_s

    async def tick(self) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        if not self.first_at_once:
            await asyncio.sleep(self.period_s)
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception(f"{self.task_name.replace('-', '_')}_failed")
            await asyncio.sleep(self.period_s)  # the period, not a wait for an event
