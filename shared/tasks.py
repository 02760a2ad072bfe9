"""A service's long-running loops: started with the app, cancelled when it stops."""

from __future__ import annotations

import asyncio


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
