"""Fixtures of the audit tests: the app on a fresh database, its store, tokens (the bus
that publishes what it records is `bus`, from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pymongo import AsyncMongoClient

from services.audit.app import create_app
from services.audit.settings import AuditSettings
from services.audit.store import AuditStore
from shared.auth import Role, TokenStore
from shared.mongo import Document, connect
from shared.settings import AmqpSettings, MongoSettings

Client = TestClient[Any, Any]
StartApp = Callable[[], Awaitable[Client]]


@pytest.fixture
def audit_settings(
    amqp_settings: AmqpSettings, mongo_settings: MongoSettings, db_prefix: str
) -> AuditSettings:
    return AuditSettings(amqp=amqp_settings, mongo=mongo_settings, database=f"{db_prefix}audit")


@pytest.fixture
def start_app(audit_settings: AuditSettings, aiohttp_client: Any) -> StartApp:
    """Starts an audit app (another one on the same database after a restart).

    The apps stop before the vhost is deleted: `audit_settings` is set up first.
    """

    async def start() -> Client:
        client: Client = await aiohttp_client(create_app(audit_settings))
        return client

    return start


@pytest.fixture
async def records(
    mongo_settings: MongoSettings, audit_settings: AuditSettings
) -> AsyncIterator[AuditStore]:
    """The audit store itself, for looking behind the API (and tampering)."""
    client: AsyncMongoClient[Document] = connect(mongo_settings)
    yield AuditStore(client[audit_settings.database])
    await client.close()


@pytest.fixture
async def token(mongo_settings: MongoSettings) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Makes a bearer token for a tenant and role."""
    client = connect(mongo_settings)
    tokens = TokenStore(client[mongo_settings.identity_db])

    async def make(tenant: str, role: Role = Role.user) -> str:
        return await tokens.create(f"{role.value}-{tenant}", tenant, role)

    yield make
    await client.close()
