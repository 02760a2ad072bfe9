"""Token lookups on the real database server: cached, and shared by the requests that
miss the cache together."""

from __future__ import annotations

import asyncio

from pymongo import AsyncMongoClient, monitoring

from shared.auth import Role, TokenStore
from shared.settings import MongoSettings


class FindsOfTokens(monitoring.CommandListener):
    """Counts the `find`s the client sends to the tokens collection."""

    def __init__(self) -> None:
        self.count = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find" and event.command.get("find") == "tokens":
            self.count += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_requests_that_miss_the_cache_together_share_one_lookup(
    mongo_settings: MongoSettings, db_prefix: str
) -> None:
    finds = FindsOfTokens()
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        mongo_settings.url.get_secret_value(), event_listeners=[finds]
    )
    try:
        store = TokenStore(client[f"{db_prefix}identity"], cache_s=60)
        token = await store.create("ci", "radiology", Role.user)
        answers = await asyncio.gather(*(store.verify(token) for _ in range(50)))
        assert {(p.tenant, p.role) for p in answers if p is not None} == {("radiology", Role.user)}
        assert all(answers) and finds.count == 1
        await store.verify(token)  # cached
        unknown = await asyncio.gather(*(store.verify("mh_unknown") for _ in range(20)))
        assert unknown == [None] * 20 and finds.count == 2
    finally:
        await client.close()
