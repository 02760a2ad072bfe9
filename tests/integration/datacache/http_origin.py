"""A real HTTP origin on loopback for the HTTP source and the benchmark: files by path,
optional bearer auth, Range and ETag support, injected failures, request counters."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

from tests.helpers import serving

RANGE = re.compile(r"bytes=(\d+)-$")


@dataclass
class Origin:
    files: dict[str, bytes] = field(default_factory=dict)
    token: str | None = None
    ranges: bool = True
    #: Answer the next N downloads (GET) with 503.
    fail_next: int = 0
    #: Cut the body of the next N downloads after this many bytes (a dropped connection).
    cut_next: int = 0
    cut_at: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    body_bytes: int = 0
    uploads: dict[str, bytes] = field(default_factory=dict)
    url: str = ""
    #: When set, a download stops after its first chunk until the gate opens (a slow
    #: source, so that a test can act while a fetch is under way).
    gate: asyncio.Event | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    #: path -> where a GET of it is redirected (302 with that Location).
    redirects: dict[str, str] = field(default_factory=dict)
    #: The Authorization header of every request (None where there was none).
    authorizations: list[str | None] = field(default_factory=list)
    #: A Content-Encoding to claim for every body (a server that ignores identity).
    encoding: str | None = None

    def etag(self, path: str) -> str:
        return '"' + hashlib.sha256(self.files[path]).hexdigest()[:16] + '"'

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests[request.method] += 1
        self.authorizations.append(request.headers.get("Authorization"))
        if (
            self.token is not None
            and request.headers.get("Authorization") != f"Bearer {self.token}"
        ):
            return web.Response(status=401, text="no")
        if self.fail_next and request.method == "GET":
            self.fail_next -= 1
            return web.Response(status=503, text="busy")
        path = request.match_info["path"]
        if path in self.redirects:
            return web.Response(status=302, headers={"Location": self.redirects[path]})
        if request.method == "PUT":
            self.uploads[path] = await request.read()
            return web.Response(status=201)
        if path not in self.files:
            return web.Response(status=404, text="missing")
        data, etag = self.files[path], self.etag(path)
        headers = {"ETag": etag}
        if self.ranges:
            headers["Accept-Ranges"] = "bytes"
        if self.encoding:
            headers["Content-Encoding"] = self.encoding
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return web.Response(status=200, headers=headers)
        start, status = 0, 200
        match = RANGE.match(request.headers.get("Range", ""))
        if self.ranges and match and request.headers.get("If-Range") in (None, etag):
            start, status = int(match.group(1)), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(data) - start
        await response.prepare(request)
        cut = self.cut_at if self.cut_next else None
        if cut is not None:
            self.cut_next -= 1
        view = memoryview(data)[start:]
        step = 1 << 20
        for offset in range(0, len(view), step):
            piece = view[offset : offset + step]
            if cut is not None and offset + len(piece) > cut:
                await response.write(piece[: max(cut - offset, 0)])
                self.body_bytes += max(cut - offset, 0)
                assert request.transport is not None
                request.transport.close()  # the connection drops mid-body
                return response
            await response.write(piece)
            self.body_bytes += len(piece)
            self.started.set()
            if self.gate is not None:
                await self.gate.wait()
        await response.write_eof()
        return response


@asynccontextmanager
async def serve_origin(origin: Origin) -> AsyncIterator[Origin]:
    async with serving(origin.app()) as url:
        origin.url = url
        yield origin
