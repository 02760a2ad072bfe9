"""Ordered stages of a pipeline over batches, each running in a worker thread.

The datacache seals what it stages, and a node opens what it fetches, as a pipeline:
a batch is sealed (or opened) in any order, on any core, and then hashed and written,
two stages that must each take the batches in the order they came. `in_turn` is one
step of such an ordered stage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def in_turn(
    previous: asyncio.Future[None] | None, ready: Awaitable[T], work: Callable[[T], object]
) -> None:
    """`work` on what `ready` gives, in a worker thread, once the same stage is done with
    the batch before (`previous`). A failure before it is raised here instead, so after
    a failure the stage does nothing more."""
    value = await ready
    if previous is not None:
        await previous
    await asyncio.to_thread(work, value)
