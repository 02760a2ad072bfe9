"""How every medhive service is wired: one aiohttp app with the bus and the database.

`create_service_app` does no I/O. The connections open in `cleanup_ctx` generators,
in dependency order (database, then bus); a service appends its own contexts
(consumers, background loops) after these, so they stop first on shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from pymongo import AsyncMongoClient

from shared.auth import TokenStore
from shared.bus import Bus
from shared.http import LIMITS, MAX_JSON_BODY_BYTES, TOKENS, auth_middleware, error_middleware
from shared.mongo import Document, connect
from shared.openapi import OPENAPI_PATH, openapi_document
from shared.settings import AmqpSettings, MongoSettings, default_host

BUS = web.AppKey("bus", Bus)
OPENAPI = web.AppKey("openapi", dict[str, Any])
#: What each API is for, at the top of its OpenAPI document.
API_DESCRIPTIONS = {
    "scheduler": "Jobs: submit, follow, cancel; their logs and results; the nodes.",
    "audit": "The audit trail: query records, follow them live, verify the hash chain.",
    "datacache": "Job data: nodes read inputs and store results under a live grant; "
    "tenants read their jobs' results.",
}
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
    app = web.Application(middlewares=middlewares, client_max_size=MAX_JSON_BODY_BYTES)

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

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(api_document(request.app, service))

    app.cleanup_ctx.extend([database, bus])
    app.router.add_get("/healthz", healthz)
    if service in API_DESCRIPTIONS:  # a service with an HTTP API describes it
        app[OPENAPI] = {}
        app.router.add_get(OPENAPI_PATH, openapi)
    return app


def api_document(app: web.Application, service: str) -> dict[str, Any]:
    """The OpenAPI document of a service's HTTP API (built at the first request, then
    kept in a slot made with the app: a running app takes no new keys)."""
    kept = app.get(OPENAPI)
    if not kept:
        description = API_DESCRIPTIONS.get(service, "")
        document = openapi_document(app, f"medhive {service} API", f"{description}\n\n{LIMITS}")
        if kept is None:
            return document
        kept.update(document)
        return kept
    return kept
