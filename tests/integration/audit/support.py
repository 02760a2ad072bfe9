"""Helpers of the audit tests: waiting on the store, auth headers, reading SSE."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import ClientResponse
from pymongo.asynchronous.collection import AsyncCollection

from shared.mongo import Document

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T | None]], within_s: float = 10.0) -> T:
    """Poll `check` until it returns something: the store has no event to wait on."""
    async with asyncio.timeout(within_s):
        while True:
            if (found := await check()) is not None:
                return found
            await asyncio.sleep(0.02)


async def stored(records: AsyncCollection[Document], count: int) -> list[Document]:
    """Wait until the store holds `count` records; returns them in `seq` order."""

    async def enough() -> bool | None:
        return await records.count_documents({}) >= count or None

    await eventually(enough)
    return await records.find().sort("seq", 1).to_list()


async def record_of(records: AsyncCollection[Document], record_id: str) -> Document:
    """Wait until the record of one message is stored."""
    return await eventually(lambda: records.find_one({"_id": record_id}))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def next_event(response: ClientResponse, within_s: float = 10.0) -> dict[str, Any]:
    """The next server-sent event (comment lines skipped): its fields, `data` decoded."""
    fields: dict[str, Any] = {}
    async with asyncio.timeout(within_s):
        while True:
            line = (await response.content.readline()).decode()
            if not line:
                raise EOFError("the stream ended")
            line = line.rstrip("\n")
            if line == "":
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = json.loads(value) if name == "data" else value
