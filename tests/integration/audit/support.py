"""Helpers of the audit tests: waiting on the store, auth headers, reading SSE."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import ClientResponse

from services.audit.store import AuditStore
from shared.mongo import Document
from tests.helpers import eventually


async def stored(store: AuditStore, count: int) -> list[Document]:
    """Wait until the store holds `count` records; returns them in `seq` order."""

    async def enough() -> list[Document] | None:
        found = [record async for record in store.in_seq_order()]
        return found if len(found) >= count else None

    return await eventually(enough)


async def record_of(store: AuditStore, record_id: str) -> Document:
    """Wait until the record of one message is stored."""

    async def find() -> Document | None:
        block = await store.blocks.find_one({"ids": record_id})
        if block is None:
            return None
        return next(record for record in block["records"] if record["_id"] == record_id)

    return await eventually(find)


async def rewrite(
    store: AuditStore, seq: int, change: Callable[[Document], Document | None]
) -> None:
    """Tamper with the stored record `seq`, in its block: `change` gives what replaces it
    (None: nothing). The block's other fields stay as they were."""
    block = await store.blocks.find_one({"_id": {"$lte": seq}, "last": {"$gte": seq}})
    assert block is not None, f"no block holds record {seq}"
    records = []
    for record in block["records"]:
        replaced = change(dict(record)) if record["seq"] == seq else record
        if replaced is not None:
            records.append(replaced)
    await store.blocks.replace_one({"_id": block["_id"]}, {**block, "records": records})


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
