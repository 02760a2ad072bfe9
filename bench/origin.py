"""A plain HTTP origin for benchmarks: serves files of a directory with sendfile, ETag and
Range (aiohttp's FileResponse), and counts what it sent at `GET /_stats`.

`python -m bench.origin DIRECTORY PORT`
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

STATS: web.AppKey[Counter[str]] = web.AppKey("stats")


@web.middleware
async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    if request.path != "/_stats":
        stats = request.app[STATS]
        stats[f"{request.method}_requests"] += 1
        if request.method == "GET":
            stats["body_bytes"] += response.content_length or 0
    return response


def create_app(root: Path) -> web.Application:
    app = web.Application(middlewares=[count])
    app[STATS] = Counter()

    async def serve(request: web.Request) -> web.StreamResponse:
        path = (root / request.match_info["name"]).resolve()
        if not path.is_relative_to(root.resolve()) or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, chunk_size=1 << 20)

    async def stats(request: web.Request) -> web.Response:
        sent: Counter[str] = request.app[STATS]
        return web.json_response(dict(sent))

    app.router.add_get("/_stats", stats)
    app.router.add_get("/{name}", serve)
    return app


if __name__ == "__main__":
    web.run_app(create_app(Path(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), print=None)
