"""Blocking calls in worker threads that a cancellation does not leave dangling.

`await asyncio.to_thread(open, ...)` leaks the file when the awaiting task is cancelled
while the thread runs (a client that goes away mid-request does that): the thread still
opens it, and nobody is left to close it. `acquired` lets the thread finish and gives
the resource back at once in that case. `interruptible` does the same for a call that
fills a buffer, which must not be reused before the call has returned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")


async def acquired(take: Callable[[], T], give_back: Callable[[T], object]) -> T:
    """`take()` in a worker thread; if the caller is cancelled before it returns, what
    it took is given back (`give_back`) as soon as it has it."""
    taking = asyncio.ensure_future(asyncio.to_thread(take))
    try:
        return await asyncio.shield(taking)
    except asyncio.CancelledError:

        def undo(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                give_back(done.result())

        taking.add_done_callback(undo)
        raise


async def interruptible(
    call: Callable[[], T], interrupt: Callable[[], object], executor: Executor | None = None
) -> T:
    """`call()` in a worker thread (of `executor`, else the loop's own). If the caller is
    cancelled meanwhile, `interrupt()` makes the call return early (a read waiting on the
    network), and the cancellation goes on only once the thread has let go of what it
    was given: a buffer it fills must not be used again while it still writes into it."""
    running = asyncio.get_running_loop().run_in_executor(executor, call)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        interrupt()
        await asyncio.wait([running])
        if not running.cancelled():
            running.exception()  # what the interrupted call raised: the caller was cancelled
        raise
