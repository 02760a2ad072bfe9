"""How a medhive service listens: aiohttp's app runner, with every answer in JSON.

aiohttp answers a request its HTTP parser refuses (a request line or header over 8 KB,
bytes in the URL that are not ASCII, something that is not HTTP at all) itself, before
any middleware runs, and in plain text. Clients of medhive get one error shape from
every answer, so the connection handler here gives those answers the shape that
`shared.http.error_response` gives the rest.
"""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

from shared.http import MAX_LINE_BYTES, error_response

#: What aiohttp's own `run_app` keeps an idle connection open for.
KEEPALIVE_S = 75.0
#: Set by an app whose requests can wait long for something to send (a live stream):
#: a client that goes away then cancels its handler at once. aiohttp's default lets a
#: handler run on until it next writes, so a waiting stream would keep what it holds
#: (a slot of its token's bounded few) until its next keep-alive.
CANCEL_ON_DISCONNECT = web.AppKey("cancel_on_disconnect", bool)


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering parser errors in medhive's JSON shape."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp logs the error, and refuses to answer once a response has begun.
        super().handle_error(request, status, exc, message)
        if status >= 500:  # an error that escaped the app: say nothing about it
            detail = "internal error; the operator's logs have the details"
        else:
            detail = f"the request is not well-formed HTTP: {message or 'bad request'}"
        response = error_response(status, detail)
        response.force_close()
        return response


class Listener:
    """A running app and the socket it answers on."""

    def __init__(self, runner: web.AppRunner, server: asyncio.Server) -> None:
        self.runner = runner
        self.server = server

    @property
    def port(self) -> int:
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        """Stop accepting, finish the requests under way, then run the app's cleanup."""
        self.server.close()
        await self.runner.cleanup()
        await self.server.wait_closed()


async def listen(app: web.Application, host: str, port: int) -> Listener:
    """Start `app` (its startup and cleanup contexts) and answer on host:port."""
    loop = asyncio.get_running_loop()
    runner = web.AppRunner(app, handler_cancellation=app.get(CANCEL_ON_DISCONNECT, False))
    await runner.setup()
    connections = runner.server
    assert connections is not None  # set by setup()
    try:
        server = await loop.create_server(
            lambda: JsonErrorRequestHandler(
                connections,
                loop=loop,
                keepalive_timeout=KEEPALIVE_S,
                max_line_size=MAX_LINE_BYTES,
                max_field_size=MAX_LINE_BYTES,
            ),
            host,
            port,
            reuse_address=True,
        )
    except BaseException:
        await runner.cleanup()
        raise
    return Listener(runner, server)


async def serve(app: web.Application, host: str, port: int) -> None:
    """Run `app` on host:port until SIGINT or SIGTERM, then shut it down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    listener = await listen(app, host, port)
    try:
        await stop.wait()
    finally:
        await listener.close()


def run_service(app: web.Application, host: str, port: int) -> None:
    """The entry point of every `python -m services.<name>`."""
    asyncio.run(serve(app, host, port))
