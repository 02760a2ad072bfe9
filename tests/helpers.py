"""Test helpers shared by the integration and end-to-end tests: tokens, event taps."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aiohttp import web
from aiohttp.test_utils import TestServer

from shared.auth import Role, TokenStore
from shared.bus import Bus
from shared.http import METRICS_PATH
from shared.messages.catalog import COMMANDS, EVENTS, TENANTS
from shared.mongo import connect
from shared.settings import AmqpSettings, MongoSettings

T = TypeVar("T")


async def make_token(
    mongo: MongoSettings, tenant: str, role: Role = Role.user, name: str | None = None
) -> str:
    client = connect(mongo)
    try:
        return await TokenStore(client[mongo.identity_db]).create(
            name or f"{tenant}-{role}", tenant, role
        )
    finally:
        await client.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class EventTap:
    """An exclusive queue bound to routing keys; waits for matching messages."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def _on(self, message: AbstractIncomingMessage) -> None:
        async with message.process():
            try:
                body = json.loads(message.body)
            except ValueError:
                body = {"raw": message.body.decode("utf-8", "replace")}
            body["_routing_key"] = message.routing_key
            async with self._changed:
                self.messages.append(body)
                self._changed.notify_all()

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], within: float = 30.0
    ) -> dict[str, Any]:
        """The first message (seen already or arriving) that matches."""
        async with asyncio.timeout(within), self._changed:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                await self._changed.wait()

    def of_job(self, job_id: str, prefix: str = "job.") -> list[dict[str, Any]]:
        return [
            m for m in self.messages
            if m.get("correlation_id") == job_id and str(m.get("type", "")).startswith(prefix)
        ]  # fmt: skip


@asynccontextmanager
async def event_tap(
    amqp: AmqpSettings, keys: list[str], exchange: str = EVENTS
) -> AsyncIterator[EventTap]:
    """Events of types matching `keys`, from the services' exchange and, for events,
    from every tenant's channel too (where job events go)."""
    connection = await aio_pika.connect(amqp.url.get_secret_value())
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        for key in keys:
            await queue.bind(exchange, key)
            if exchange == EVENTS:
                await queue.bind(TENANTS, key if key == "#" else f"*.{key}")
        tap = EventTap()
        await queue.consume(tap._on)
        yield tap
    finally:
        await connection.close()


async def publish_raw(amqp_url: str, body: bytes, routing_key: str, **properties: Any) -> None:
    """Publish bytes as another system would, with any AMQP client."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(COMMANDS, ensure=False)
        await exchange.publish(aio_pika.Message(body, **properties), routing_key)
    finally:
        await connection.close()


async def eventually(check: Callable[[], Awaitable[T]], within: float = 30.0) -> T:
    """Re-check a condition that has no event to wait on (state in another process, or
    a store with no change stream); returns its first answer that is not false or None."""
    async with asyncio.timeout(within):
        while not (found := await check()):  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0.02)
    return found


#: Who calls, in the role matrices of the HTTP APIs (`metrics`: a Prometheus token).
CALLERS = ("none", "invalid", "user", "other_user", "operator", "node", "other_node", "metrics")
#: What every service's `/metrics` answers each caller.
METRICS_ROUTE = {"none": 401, "invalid": 401, "user": 403, "other_user": 403, "operator": 200,
                 "node": 403, "other_node": 403, "metrics": 200}  # fmt: skip


def routes_of(app: Any, *, with_metrics: bool = False) -> set[tuple[str, str]]:
    """(method, path template) of every route an app serves, health checks aside, and
    `/metrics` unless asked for: neither is in an API's OpenAPI document."""
    hidden = {"/healthz"} if with_metrics else {"/healthz", METRICS_PATH}
    return {
        (route.method, resource.canonical)
        for resource in app.router.resources()
        for route in resource
        if route.method not in ("HEAD", "*") and resource.canonical not in hidden
    }


async def check_role_matrix(
    client: Any,
    table: dict[tuple[str, str], dict[str, int]],
    headers: dict[str, dict[str, str]],
    fill: Callable[[str], str],
    body: Callable[[str, str], dict[str, Any]] | None = None,
) -> None:
    """Every route of the app answers each caller with the status the table gives.

    The table must name every route the app serves, so a new route without an entry
    fails; `fill` puts real ids into a path template, `body` gives request arguments.
    """
    every_route = routes_of(client.app, with_metrics=True)
    assert set(table) == every_route, "every route needs an entry in the table"
    wrong = []
    for (method, template), expected in table.items():
        assert set(expected) == set(CALLERS), template
        for who in CALLERS:
            extra = body(method, template) if body is not None else {}
            response = await client.request(method, fill(template), headers=headers[who], **extra)
            if response.status != expected[who]:
                wrong.append((method, template, who, response.status, expected[who]))
            if response.status >= 400:
                error = await response.json()
                assert error["error"]["status"] == response.status
            response.close()
    assert wrong == [], wrong


async def lease_renewed(leases: Any, name: str, times: int = 2, within: float = 30) -> None:
    """Wait until the holder of lease `name` has renewed it `times` times (its
    `renewed_at` moved): time in which a standby had every chance to take it."""
    seen: list[Any] = []

    async def moved() -> bool:
        doc = await leases.find_one({"_id": name})
        if doc is not None and (not seen or doc["renewed_at"] != seen[-1]):
            seen.append(doc["renewed_at"])
        return len(seen) > times

    await eventually(moved, within)


@asynccontextmanager
async def connected_bus(amqp: AmqpSettings, source: str) -> AsyncIterator[Bus]:
    """A connected bus whose messages name `source` (`service@host`); closed afterwards."""
    bus = Bus(amqp, source)
    await bus.connect()
    try:
        yield bus
    finally:
        await bus.close()


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """`app` served on a free loopback port; its base URL, without a trailing slash."""
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@asynccontextmanager
async def host_listener() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TCP server on every host address; what connected to it, if anything did."""
    got: list[bytes] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.read(100))
        writer.close()

    server = await asyncio.start_server(on_connect, "0.0.0.0", 0)
    async with server:
        yield server.sockets[0].getsockname()[1], got
