"""Who sent a message: the AMQP user RabbitMQ vouches for, and the tenant it acts for.

RabbitMQ refuses a `user_id` property that differs from the connection's user, so the
property proves the sender. Two kinds of senders exist. medhive's own service accounts
are trusted with whatever tenant their messages name (they took it from a stored job).
The AMQP users of other hospital systems (integrators) act for exactly one tenant
each, kept here, in the identity database beside the API tokens; what their messages
claim (tenant, actor, job) counts for nothing.

The mapping is read through a short cache, so `medhive amqp-user add` takes effect at
the next message without a restart (an unknown user is looked up again at once), and a
removal within `cache_s` (its broker user is deleted at once, so it cannot publish).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pymongo.asynchronous.database import AsyncDatabase

from shared.envelope import utcnow
from shared.mongo import Document

#: A tenant or an AMQP user name. Both become a word of a routing key and part of the
#: regular expressions of RabbitMQ's permissions: a dot, `*` or `#` would let one
#: tenant's pattern match another's keys.
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)


def check_name(name: str, what: str = "tenant") -> str:
    """`name` if it may name a tenant or an AMQP user; else ValueError saying why."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} must be 1-64 letters, digits, '_' or '-' (not starting with '-')"
        )
    return name


@dataclass(frozen=True)
class Sender:
    """The proven sender of a delivery."""

    user: str | None
    #: The tenant an integrator acts for; None for services and unknown users.
    tenant: str | None = None
    #: One of medhive's own service accounts, whose messages are believed.
    service: bool = False


class AmqpUsers:
    """AMQP users of other systems -> their tenant, in the identity database."""

    def __init__(
        self, db: AsyncDatabase[Document], services: Iterable[str], cache_s: float = 5.0
    ) -> None:
        self.users = db["amqp_users"]
        self.services = frozenset(services)
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, str | None]] = {}

    async def add(self, name: str, tenant: str) -> None:
        check_name(name, "AMQP user")
        check_name(tenant)
        await self.users.update_one(
            {"_id": name},
            {"$set": {"tenant": tenant}, "$setOnInsert": {"created_at": utcnow()}},
            upsert=True,
        )
        self._cache.pop(name, None)

    async def seed(self, mapping: dict[str, str]) -> None:
        """Add users from configuration, leaving those already stored as they are."""
        for name, tenant in mapping.items():
            check_name(name, "AMQP user")
            check_name(tenant)
            await self.users.update_one(
                {"_id": name},
                {"$setOnInsert": {"tenant": tenant, "created_at": utcnow(), "seeded": True}},
                upsert=True,
            )

    async def remove(self, name: str) -> bool:
        self._cache.pop(name, None)
        return (await self.users.delete_one({"_id": name})).deleted_count == 1

    async def all(self) -> list[Document]:
        return await self.users.find().sort("_id", 1).to_list()

    async def tenant_of(self, user: str) -> str | None:
        """The tenant `user` acts for, or None. An unknown user is not cached, so a
        user added a moment ago is found at once."""
        now = time.monotonic()
        cached = self._cache.get(user)
        if cached is not None and cached[0] > now:
            return cached[1]
        doc = await self.users.find_one({"_id": user}, {"tenant": 1})
        tenant = None if doc is None else str(doc["tenant"])
        if tenant is not None:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[user] = (now + self.cache_s, tenant)
        return tenant

    async def sender(self, user: str | None) -> Sender:
        """Who `user` is: a service account, an integrator of a tenant, or unknown."""
        if user is None:
            return Sender(None)
        if user in self.services:
            return Sender(user, service=True)
        return Sender(user, await self.tenant_of(user))
