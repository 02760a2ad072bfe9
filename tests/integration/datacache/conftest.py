"""A datacache app per test, with an HTTP origin as its configured source, a node token,
and the scheduler's side of the protocol played through the bus."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from services.datacache.app import create_app
from services.datacache.settings import DatacacheSettings
from shared.auth import Role
from shared.bus import Bus
from shared.envelope import utcnow
from shared.messages.data import DataGrant, DataRelease, DataStage, InputSpec
from shared.settings import AmqpSettings, MongoSettings
from tests.helpers import EventTap, bearer, event_tap, make_token
from tests.integration.datacache.http_origin import Origin, serve_origin


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with serve_origin(Origin(token="origin-token")) as served:
        yield served


@pytest.fixture
def datacache_settings(
    tmp_path: Path,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    db_prefix: str,
    origin: Origin,
) -> DatacacheSettings:
    sources = tmp_path / "sources.json"
    sources.write_text(
        json.dumps(
            [
                {"tenant": "radiology", "match": origin.url, "token": "origin-token"},
                {"tenant": "cardiology", "match": origin.url, "token": "origin-token"},
            ]
        )
    )
    key = base64.b64encode(os.urandom(32)).decode()
    return DatacacheSettings(
        amqp=amqp_settings,
        mongo=mongo_settings,
        database=f"{db_prefix}datacache",
        cache_dir=tmp_path / "cache",
        master_key=SecretStr(f"k1:{key}"),
        sources_file=sources,
        fetch_backoff_s=0.05,
        fetch_attempts=3,
        progress_interval_s=0.0,
        eviction_interval_s=3600,
    )


@dataclass
class Harness:
    """The datacache under test and the parties around it."""

    client: TestClient
    bus: Bus
    events: EventTap
    node_auth: dict[str, str]
    other_node_auth: dict[str, str]
    user_auth: dict[str, str]

    async def stage(self, job_id: str, *sources: str, tenant: str = "radiology") -> None:
        inputs = [
            InputSpec(name=f"in{i}", source=s, path=f"/data/in{i}") for i, s in enumerate(sources)
        ]
        await self.bus.emit(
            "data.stage",
            DataStage(job_id=job_id, inputs=inputs),
            correlation_id=job_id,
            tenant=tenant,
        )

    async def staged(self, job_id: str) -> dict[str, Any]:
        return await self.events.wait_for(
            lambda m: m["type"] in ("data.staged", "data.failed") and m["correlation_id"] == job_id
        )

    async def grant(
        self,
        job_id: str,
        node: str = "node-1",
        tenant: str = "radiology",
        seconds: float = 600,
        attempt: int = 1,
    ) -> dict[str, Any]:
        expires = utcnow() + timedelta(seconds=seconds)
        await self.bus.emit(
            "data.grant",
            DataGrant(
                job_id=job_id,
                attempt=attempt,
                node_id=node,
                expires_at=expires,
                upload_until=expires,
            ),
            correlation_id=job_id,
            tenant=tenant,
        )
        return await self.events.wait_for(
            lambda m: (
                m["type"] in ("data.granted", "data.failed")
                and m["correlation_id"] == job_id
                and m["payload"].get("attempt", attempt) == attempt
            )
        )

    async def release(self, job_id: str, upload_to: str | None = None) -> dict[str, Any]:
        await self.bus.emit(
            "data.release",
            DataRelease(job_id=job_id, reason="done", upload_to=upload_to),
            correlation_id=job_id,
            tenant="radiology",
        )
        return await self.events.wait_for(
            lambda m: m["type"] == "data.released" and m["correlation_id"] == job_id
        )

    async def inputs(
        self, job_id: str, auth: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        return await self.client.get(f"/v1/jobs/{job_id}/inputs", headers=auth or self.node_auth)

    async def read(
        self, job_id: str, sha: str, auth: dict[str, str] | None = None, **headers: str
    ) -> aiohttp.ClientResponse:
        return await self.client.get(
            f"/v1/jobs/{job_id}/objects/{sha}", headers={**(auth or self.node_auth), **headers}
        )


@pytest.fixture
async def make_harness(
    datacache_settings: DatacacheSettings,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    aiohttp_client: Any,
) -> AsyncIterator[Callable[..., Any]]:
    """Builds the harness; call again for a restarted datacache on the same state."""
    bus = Bus(amqp_settings, "scheduler@test")
    await bus.connect()
    node = bearer(await make_token(mongo_settings, "_nodes", Role.node, name="node-1"))
    other = bearer(await make_token(mongo_settings, "_nodes", Role.node, name="node-2"))
    user = bearer(await make_token(mongo_settings, "radiology"))
    async with event_tap(amqp_settings, ["data.*"]) as events:

        async def build(settings: DatacacheSettings | None = None) -> Harness:
            client = await aiohttp_client(create_app(settings or datacache_settings))
            return Harness(client, bus, events, node, other, user)

        yield build
    await bus.close()


@pytest.fixture
async def harness(make_harness: Callable[..., Any]) -> Harness:
    built: Harness = await make_harness()
    return built
