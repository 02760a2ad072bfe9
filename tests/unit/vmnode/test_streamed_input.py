"""A node reading a large input: the thread that reads it drives the opening pipeline
itself, and a job cancelled meanwhile must not wait for the datacache to send more."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from services.datacache.blobs import BlobStore
from services.datacache.crypto import LocalKeyProvider
from services.vmnode.jobdata import JobData
from services.vmnode.settings import NodeSettings
from shared.sealed import DATA_KEY_HEADER
from tests.helpers import eventually, serving

MIB = 1 << 20


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_a_cancelled_fetch_lets_go_of_the_datacache_at_once(tmp_path: Path) -> None:
    """The datacache here sends the header and a first MiB of a sealed object, then
    nothing until the gate opens; the node's read timeout is minutes away."""
    store = BlobStore(tmp_path / "cache", LocalKeyProvider({"k1": os.urandom(32)}))
    blob = await store.write(_chunks(os.urandom(12 * MIB)))
    sealed = store.sealed(blob.blob_id)
    raw = sealed.path.read_bytes()
    gate = asyncio.Event()

    async def stalls(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={DATA_KEY_HEADER: base64.b64encode(sealed.data_key).decode()}
        )
        response.content_length = len(raw)
        await response.prepare(request)
        await response.write(raw[:MIB])
        await gate.wait()
        return response

    app = web.Application()
    app.router.add_get("/object", stalls)
    target = tmp_path / "jobs" / "ct.bin"
    async with serving(app) as url:
        node = JobData(
            NodeSettings(node_id="node-1", datacache_url=f"{url}/", work_dir=tmp_path / "jobs")
        )
        try:
            fetching = asyncio.create_task(node._streamed("object", "ct.bin", target))
            # Created by the thread that reads and opens it: the reading is under way.
            await eventually(lambda: asyncio.to_thread(target.exists))
            fetching.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(fetching, 30)  # the guard against a hang, not a timing
        finally:
            gate.set()
            await node.close()
