"""How every medhive service is wired: one aiohttp app with the bus and the database.

`create_service_app` does no I/O. The connections open in `cleanup_ctx` generators,
in dependency order (database, then bus); a service appends its own contexts
(consumers, background loops) after these, so they stop first on shutdown.

Every app checks bearer tokens, even one with no API of its own (netgw, the node
agent): its `/metrics` is for `metrics` and `operator` tokens only. A service adds
what it exports to the app's `METRICS` (`shared.metrics`) as its parts start.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from pymongo import AsyncMongoClient

from shared.auth import TokenStore
from shared.bus import Bus
from shared.http import (
    LIMITS,
    MAX_JSON_BODY_BYTES,
    METRICS_PATH,
    TOKENS,
    auth_middleware,
    error_middleware,
)
from shared.metrics import METRICS, ConsumerCollector, Metrics, scrape
from shared.mongo import Document, connect
from shared.openapi import OPENAPI_PATH, openapi_document
from shared.settings import AmqpSettings, MongoSettings, default_host

BUS = web.AppKey("bus", Bus)
OPENAPI = web.AppKey("openapi", dict[str, Any])
#: What each API is for, at the top of its OpenAPI document.
API_DESCRIPTIONS = {
    "scheduler": "Jobs: submit, follow, cancel; their logs and results; the nodes; "
    "webhooks that send a tenant its jobs' events. It "
    "also serves the web console at `/ui/` and, for it, answers the audit's read routes "
    "(described in the audit's document) with the caller's token.",
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
) -> web.Application:
    """An app with JSON errors, bearer auth, `/healthz`, `/metrics`, a database client
    and a bus."""
    app = web.Application(
        middlewares=[error_middleware, auth_middleware], client_max_size=MAX_JSON_BODY_BYTES
    )
    app[METRICS] = Metrics()

    async def database(app: web.Application) -> AsyncIterator[None]:
        client = connect(mongo)
        app[MONGO] = client
        app[TOKENS] = TokenStore(client[mongo.identity_db])
        yield
        await client.close()

    async def bus(app: web.Application) -> AsyncIterator[None]:
        app[BUS] = Bus(amqp, source_name(service))
        await app[BUS].connect()
        app[METRICS].add(ConsumerCollector(app[BUS]))
        yield
        await app[BUS].close()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"service": service, "status": "ok"})

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(api_document(request.app, service))

    app.cleanup_ctx.extend([database, bus])
    app.router.add_get("/healthz", healthz)
    app.router.add_get(METRICS_PATH, scrape)
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
