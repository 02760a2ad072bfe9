"""Trying a source again while it is unavailable: doubling waits, then a reason."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from services.datacache.settings import DatacacheSettings
from services.datacache.sources.base import SourceUnavailable
from shared.backoff import Backoff

log = structlog.get_logger("medhive.datacache.retries")
T = TypeVar("T")


async def with_retries(
    settings: DatacacheSettings, source: str, attempt: Callable[[], Awaitable[T]]
) -> T:
    """Run `attempt`, again after doubling waits while it raises `SourceUnavailable`.

    `SourceRefused` and anything else pass through at once: retrying cannot help. After
    the last try the error names the source and how many tries it got.
    """
    backoff = Backoff(settings.fetch_backoff_s, settings.fetch_backoff_max_s)
    for number in range(1, settings.fetch_attempts + 1):
        try:
            return await attempt()
        except SourceUnavailable as exc:
            if number == settings.fetch_attempts:
                raise SourceUnavailable(
                    f"{source}: unavailable after {number} tries; last error: {exc}"
                ) from exc
            wait = backoff.next()
            log.warning(
                "source_unavailable",
                source=source,
                attempt=number,
                retry_in_s=wait,
                reason=str(exc),
            )
            await asyncio.sleep(wait)  # the backoff itself, not a wait for an event
    raise AssertionError("fetch_attempts is at least 1")
