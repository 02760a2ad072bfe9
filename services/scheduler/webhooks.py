"""Tenants' webhooks: where a tenant wants its jobs' events sent, and the secret that
signs every delivery (the Standard Webhooks specification; deliveries.py sends them).

A webhook belongs to the tenant of the token that registered it; another tenant's is
indistinguishable from one that does not exist. Its URL passes the SSRF guard
(egress.py) at registration and again at every delivery.

**Secrets.** Each webhook has its own: `whsec_` and the base64 of 32 random bytes,
shown to the tenant once, in the answer to the registration. The scheduler needs the
secret itself to sign (a hash would not do), so with `webhook_secret_key` set each is
stored sealed with AES-256-GCM under that key, the webhook's id as associated data (a
sealed secret copied onto another webhook does not open): a dump of the database alone
gives no secret away. Without the key they are stored as they are, and the scheduler
says so at start (`webhook_secrets_unsealed`). A secret stored either way stays
readable when the key is set later; a secret sealed under a key that is gone is not,
and its deliveries fail with that reason until the webhook is registered again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final

import structlog
from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import AfterValidator, SecretStr, WithJsonSchema
from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase

from services.scheduler.egress import Guard
from shared.envelope import utcnow
from shared.messages.catalog import CATALOG
from shared.messages.jobs import JobEvent, JobInteractive
from shared.mongo import Document

log = structlog.get_logger("medhive.scheduler.webhooks")

#: The events a webhook may ask for: its tenant's jobs' state changes, and where to
#: reach a guest that is ready.
JOB_EVENTS: Final = tuple(
    name
    for name, entry in CATALOG.items()
    if entry.for_tenants and entry.model in (JobEvent, JobInteractive)
)
#: Every one of them, now and as more are added.
ALL_JOB_EVENTS: Final = "job.*"
#: What a test delivery's `type` is; sent whatever events the webhook asked for.
TEST_EVENT: Final = "webhook.test"
SECRET_PREFIX: Final = "whsec_"
_NONCE_BYTES = 12


def known_event(name: str) -> str:
    """An event a webhook may ask for, or ValueError naming those it may."""
    if name != ALL_JOB_EVENTS and name not in JOB_EVENTS:
        raise ValueError(
            f"unknown event {name!r}: one of {ALL_JOB_EVENTS}, {', '.join(JOB_EVENTS)}"
        )
    return name


#: One entry of a webhook's `events`, as the API reads and documents it.
EventName = Annotated[
    str,
    AfterValidator(known_event),
    WithJsonSchema({"type": "string", "enum": [ALL_JOB_EVENTS, *JOB_EVENTS]}),
]


def wanted_by(event_type: str) -> list[str]:
    """The `events` entries of which any makes a webhook want `event_type`."""
    return [event_type, ALL_JOB_EVENTS]


def new_secret() -> str:
    """A signing secret as Standard Webhooks writes them."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sealing_key(value: SecretStr | None) -> SecretStr | None:
    """`webhook_secret_key`: the base64 of 32 bytes, or ValueError."""
    if value is not None:
        SecretBox.from_setting(value)
    return value


#: The setting's type, checked when the settings are read.
SealingKey = Annotated[SecretStr | None, AfterValidator(sealing_key)]


class SecretBox:
    """Seals and opens webhooks' secrets (module docstring); `key` None: stored plain."""

    def __init__(self, key: bytes | None) -> None:
        self._aead = AESGCM(key) if key is not None else None

    @classmethod
    def from_setting(cls, value: SecretStr | None) -> SecretBox:
        if value is None:
            return cls(None)
        try:
            key = base64.b64decode(value.get_secret_value(), validate=True)
        except binascii.Error:
            raise ValueError("webhook_secret_key is not base64") from None
        if len(key) != 32:
            raise ValueError("webhook_secret_key is not 32 bytes (base64 of 32 random bytes)")
        return cls(key)

    @property
    def seals(self) -> bool:
        return self._aead is not None

    def seal(self, webhook_id: str, secret: str) -> Document:
        if self._aead is None:
            return {"plain": secret}
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return {"sealed": nonce + self._aead.encrypt(nonce, secret.encode(), webhook_id.encode())}

    def open(self, webhook_id: str, stored: Document) -> str:
        """The secret; ValueError when it is sealed and cannot be opened here."""
        if "plain" in stored:
            return str(stored["plain"])
        if self._aead is None:
            raise ValueError("the webhook's secret is sealed and no webhook_secret_key is set")
        sealed = bytes(stored["sealed"])
        nonce, box = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, box, webhook_id.encode()).decode()
        except InvalidTag:
            raise ValueError("the webhook's secret does not open with webhook_secret_key") from None


class TooManyWebhooks(Exception):
    """The tenant has as many webhooks as it may have; the message says so."""


def public_webhook(doc: Document) -> dict[str, Any]:
    """A webhook as its tenant sees it: never its secret."""
    return {
        "id": doc["_id"],
        "url": doc["url"],
        "events": doc["events"],
        "created_at": doc["created_at"].isoformat(),
        "created_by": doc.get("created_by"),
    }


class Webhooks:
    """The `webhooks` collection: every tenant's registered endpoints."""

    def __init__(
        self, db: AsyncDatabase[Document], guard: Guard, box: SecretBox, limit: int
    ) -> None:
        self.collection = db["webhooks"]
        self.guard = guard
        self.box = box
        self.limit = limit
        # Counting and adding without a wait between them, per process: no overshoot;
        # and a tenant's routing follows its webhooks in the order they change.
        self._adding = asyncio.Lock()
        #: Told that a tenant has a webhook (again) or has none left: only such
        #: tenants' job events are routed to the webhook queue (webhook_service.py).
        self.routed: Callable[[str], Awaitable[None]] = _nothing
        self.unrouted: Callable[[str], Awaitable[None]] = _nothing

    async def create_indexes(self) -> None:
        await self.collection.create_index([("tenant", ASCENDING), ("events", ASCENDING)])
        if not self.box.seals:
            log.warning("webhook_secrets_unsealed", hint="set webhook_secret_key")

    async def add(
        self, tenant: str, actor: str, url: str, events: list[str]
    ) -> tuple[Document, str]:
        """Register a webhook; returns it and its secret. `TargetRefused` for a URL
        the guard refuses, `TooManyWebhooks` past the tenant's limit."""
        await self.guard.check(url)
        webhook_id = f"wh-{secrets.token_hex(10)}"
        secret = new_secret()
        doc = {
            "_id": webhook_id,
            "tenant": tenant,
            "url": url,
            "events": sorted(set(events)),
            "secret": self.box.seal(webhook_id, secret),
            "created_at": utcnow(),
            "created_by": actor,
        }
        async with self._adding:
            if await self.collection.count_documents({"tenant": tenant}) >= self.limit:
                raise TooManyWebhooks(
                    f"tenant {tenant!r} has {self.limit} webhooks, as many as it may have: "
                    "remove one first"
                )
            await self.collection.insert_one(doc)
            await self.routed(tenant)
        return doc, secret

    async def of_tenant(self, tenant: str) -> list[Document]:
        return await self.collection.find({"tenant": tenant}).sort("created_at", 1).to_list()

    async def get(self, webhook_id: str, tenant: str | None = None) -> Document | None:
        """A webhook by id; only the tenant's own when `tenant` is given."""
        query = {"_id": webhook_id} if tenant is None else {"_id": webhook_id, "tenant": tenant}
        return await self.collection.find_one(query)

    async def remove(self, webhook_id: str, tenant: str) -> Document | None:
        """Remove the tenant's webhook; returns it, or None when it has none so named."""
        async with self._adding:
            removed = await self.collection.find_one_and_delete(
                {"_id": webhook_id, "tenant": tenant}
            )
            if removed is not None and not await self.collection.find_one({"tenant": tenant}):
                await self.unrouted(tenant)
        return removed

    async def tenants(self) -> list[str]:
        """The tenants that have a webhook."""
        return sorted(await self.collection.distinct("tenant"))

    async def wanting(self, tenant: str, event_type: str) -> list[Document]:
        """The tenant's webhooks that asked for `event_type`."""
        query = {"tenant": tenant, "events": {"$in": wanted_by(event_type)}}
        return await self.collection.find(query).to_list()

    def secret(self, webhook: Document) -> str:
        return self.box.open(webhook["_id"], webhook["secret"])


async def _nothing(_: str) -> None:
    return None


WEBHOOKS = web.AppKey("webhooks", Webhooks)
