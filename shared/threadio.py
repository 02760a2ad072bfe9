"""Taking a resource (an open file) in a worker thread without losing it to a
cancellation.

`await asyncio.to_thread(open, ...)` leaks the file when the awaiting task is cancelled
while the thread runs (a client that goes away mid-request does that): the thread still
opens it, and nobody is left to close it. `acquired` lets the thread finish and gives
the resource back at once in that case.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
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
