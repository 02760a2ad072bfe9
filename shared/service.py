"""How every medhive service is wired: one aiohttp app with the bus and the database.

`create_service_app` does no I/O. The connections open in `cleanup_ctx` generators,
in dependency order (database, then bus); a service appends its own contexts
(consumers, background loops) after these, so they stop first on shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from pymongo import AsyncMongoClient

from shared.auth import TokenStore
from shared.bus import Bus
from shared.http import TOKENS, auth_middleware, error_middleware
from shared.mongo import Document, connect
from shared.settings import AmqpSettings, MongoSettings, default_host

BUS = web.AppKey("bus", Bus)
MONGO = web.AppKey("mongo", AsyncMongoClient[Document])


def source_name(service: str) -> str:
    """`service@host`, the `source` of every message this process sends."""
    return f"{service}@{default_host()}"


def create_service_app(
    service: str,
    amqp: AmqpSettings,
    mongo: MongoSettings,
    *,
    with_auth: bool = True,
) -> web.Application:
    """An app with JSON errors, bearer auth, `/healthz`, a database client and a bus."""
    middlewares = [error_middleware, auth_middleware] if with_auth else [error_middleware]
    app = web.Application(middlewares=middlewares)

    async def database(app: web.Application) -> AsyncIterator[None]:
        client = connect(mongo)
        app[MONGO] = client
        app[TOKENS] = TokenStore(client[mongo.identity_db])
        yield
        await client.close()

    async def bus(app: web.Application) -> AsyncIterator[None]:
        app[BUS] = Bus(amqp, source_name(service))
        await app[BUS].connect()
        yield
        await app[BUS].close()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"service": service, "status": "ok"})

    app.cleanup_ctx.extend([database, bus])
    app.router.add_get("/healthz", healthz)
    return app
