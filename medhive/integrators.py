"""AMQP users of other hospital systems: made, listed, rotated and removed by operators.

An integrator (a RIS, a PACS router, a research portal) gets one RabbitMQ user that
acts for one tenant. RabbitMQ's own permissions confine it, so nothing rests on the
integrator's good behaviour:

- it may publish only `job.submit` and `job.cancel` to `medhive.commands` (a topic
  permission on the routing key), and nothing to any other exchange, the default
  exchange included, so it cannot reach a service's queue directly;
- it may read only its tenant's keys of `medhive.tenants` (`<tenant>.#`): binding any
  other key there, or anything on another exchange, is refused by the broker;
- it consumes its own durable queue, `medhive.integrator.<user>`, made here and bound
  to `<tenant>.#`, where events wait while it is away (bounded: the oldest go first),
  or declares server-named queues (`amq.gen-*`) of its own and binds them to keys of
  its tenant.

`integrator_permissions` is the one statement of these rules; the README quotes it.
Users are made through RabbitMQ's management HTTP API with the service account of
`MEDHIVE_AMQP_URL` (an administrator), and mapped to their tenant in the identity
database, which the scheduler and the audit read at the next message: no restart.
Deleting a RabbitMQ user makes the broker close its connections.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from shared.identity import AmqpUsers, check_name
from shared.messages.catalog import COMMANDS, DEAD, EVENTS, INTEGRATOR_COMMANDS, TENANTS
from shared.settings import AmqpSettings

#: The integrator's own queue keeps at most this many events, none older than this.
QUEUE_BOUNDS = {
    "x-queue-type": "quorum",
    "x-max-length": 100_000,
    "x-message-ttl": 7 * 24 * 3600 * 1000,
    "x-overflow": "drop-head",
}
#: Server-named queues, which only their own connection may use.
_OWN_QUEUES = r"^amq\.gen-.*"


def integrator_queue(user: str) -> str:
    """The durable queue of one integrator, bound to its tenant's events."""
    return f"medhive.integrator.{user}"


@dataclass(frozen=True)
class Permissions:
    """What RabbitMQ lets an integrator do: vhost permissions and topic permissions."""

    configure: str
    write: str
    read: str
    #: exchange -> (write, read) patterns on routing keys.
    topics: dict[str, tuple[str, str]]


def integrator_permissions(user: str, tenant: str) -> Permissions:
    """The permissions of integrator `user` of `tenant`: the rules in the docstring."""
    check_name(user, "AMQP user")
    check_name(tenant)
    commands = "|".join(re.escape(name) for name in INTEGRATOR_COMMANDS)
    nothing = "^$"
    return Permissions(
        configure=_OWN_QUEUES,
        write=f"^{re.escape(COMMANDS)}$|{_OWN_QUEUES}",
        read=f"^{re.escape(TENANTS)}$|^{re.escape(integrator_queue(user))}$|{_OWN_QUEUES}",
        topics={
            COMMANDS: (f"^({commands})$", nothing),
            TENANTS: (nothing, f"^{re.escape(tenant)}\\."),
            # Unreachable through the vhost permissions already; said twice on purpose,
            # because a missing topic permission allows every key.
            EVENTS: (nothing, nothing),
            DEAD: (nothing, nothing),
        },
    )


class ManagementError(Exception):
    """RabbitMQ's management API refused or failed a request."""


class Management:
    """The few calls of RabbitMQ's management HTTP API that provisioning needs."""

    def __init__(self, amqp: AmqpSettings) -> None:
        url = URL(amqp.url.get_secret_value())
        self.amqp_url = url
        self.vhost = amqp.vhost
        self.base = (amqp.management_url or f"http://{url.host}:15672").rstrip("/") + "/api"
        credentials = f"{url.user or 'guest'}:{url.password or 'guest'}".encode()
        self.headers = {"Authorization": "Basic " + base64.b64encode(credentials).decode()}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Management:
        self._session = aiohttp.ClientSession(headers=self.headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _path(self, *parts: str) -> str:
        return self.base + "/" + "/".join(quote(part, safe="") for part in parts)

    async def call(self, method: str, *parts: str, body: Any = None) -> Any:
        assert self._session is not None, "use Management as a context manager"
        async with self._session.request(method, self._path(*parts), json=body) as response:
            if response.status == 404 and method in ("GET", "DELETE"):
                return None
            if response.status >= 400:
                detail = await response.text()
                raise ManagementError(f"{method} {'/'.join(parts)}: {response.status} {detail}")
            text = await response.text()
            return json.loads(text) if text.strip() else None

    async def user_exists(self, user: str) -> bool:
        return await self.call("GET", "users", user) is not None

    async def connections_of(self, user: str) -> list[dict[str, Any]]:
        found = await self.call("GET", "connections", "username", user)
        return list(found or [])

    def url_for(self, user: str, password: str, host: str | None = None) -> str:
        """The AMQP URL an integrator connects with."""
        url = self.amqp_url.with_user(user).with_password(password)
        if host is not None:
            url = url.with_host(host)
        return str(url)


async def add(
    api: Management, users: AmqpUsers, user: str, tenant: str, host: str | None = None
) -> str:
    """Make the RabbitMQ user, its permissions and its queue; map it to `tenant`.

    Returns the AMQP URL with the new password (shown this once). Refuses a user that
    exists already: `rotate_password` is for that.
    """
    rules = integrator_permissions(user, tenant)
    if await api.user_exists(user):
        raise ManagementError(f"AMQP user {user!r} exists already; see rotate-password")
    for exchange in (COMMANDS, EVENTS, TENANTS, DEAD):
        body = {"type": "topic", "durable": True, "auto_delete": False, "arguments": {}}
        await api.call("PUT", "exchanges", api.vhost, exchange, body=body)
    password = secrets.token_urlsafe(24)
    await api.call("PUT", "users", user, body={"password": password, "tags": ""})
    await api.call(
        "PUT",
        "permissions",
        api.vhost,
        user,
        body={"configure": rules.configure, "write": rules.write, "read": rules.read},
    )
    for exchange, (write, read) in rules.topics.items():
        body = {"exchange": exchange, "write": write, "read": read}
        await api.call("PUT", "topic-permissions", api.vhost, user, body=body)
    queue = integrator_queue(user)
    await api.call(
        "PUT", "queues", api.vhost, queue, body={"durable": True, "arguments": QUEUE_BOUNDS}
    )
    await api.call(
        "POST", "bindings", api.vhost, "e", TENANTS, "q", queue, body={"routing_key": f"{tenant}.#"}
    )
    await users.add(user, tenant)
    return api.url_for(user, password, host)


async def remove(api: Management, users: AmqpUsers, user: str) -> bool:
    """Delete the user (RabbitMQ closes its connections), its queue and its mapping."""
    existed = await api.user_exists(user)
    await api.call("DELETE", "users", user)
    await api.call("DELETE", "queues", api.vhost, integrator_queue(user))
    mapped = await users.remove(user)
    return existed or mapped


async def rotate_password(
    api: Management, user: str, *, disconnect: bool, host: str | None = None
) -> str:
    """A new password for `user`; with `disconnect`, its open connections are closed
    too (they stay authenticated otherwise). Returns the new AMQP URL."""
    if not await api.user_exists(user):
        raise ManagementError(f"no AMQP user {user!r}")
    password = secrets.token_urlsafe(24)
    await api.call("PUT", "users", user, body={"password": password, "tags": ""})
    if disconnect:
        await api.call("DELETE", "connections", "username", user)
    return api.url_for(user, password, host)


async def listing(api: Management, users: AmqpUsers) -> list[dict[str, Any]]:
    """Every mapped user: tenant, whether RabbitMQ knows it, connections, queued events."""
    rows = []
    for doc in await users.all():
        queue = await api.call("GET", "queues", api.vhost, integrator_queue(doc["_id"]))
        rows.append(
            {
                "user": doc["_id"],
                "tenant": doc["tenant"],
                "in_broker": await api.user_exists(doc["_id"]),
                "connections": len(await api.connections_of(doc["_id"])),
                "queued_events": (queue or {}).get("messages", 0),
            }
        )
    return rows
