"""The datacache's `/metrics`: bytes fetched and served, hits and misses, staging time,
the cache's size against its budget; and who may read them."""

from __future__ import annotations

import hashlib
import os

from services.datacache.app import EVICTOR
from services.datacache.settings import DatacacheSettings
from shared.auth import Role
from shared.settings import MongoSettings
from tests.helpers import bearer, make_token
from tests.integration.datacache.conftest import Harness
from tests.integration.datacache.http_origin import Origin
from tests.scrape import Scrape, scrape, scrape_until, status_of


async def test_metrics_count_fetches_hits_bytes_served_and_the_cache_size(
    harness: Harness,
    origin: Origin,
    mongo_settings: MongoSettings,
    datacache_settings: DatacacheSettings,
) -> None:
    url = harness.client.make_url("/metrics")
    token = await make_token(mongo_settings, "_metrics", Role.metrics)
    before = await scrape(url, token)
    assert before.value("medhive_datacache_cache_misses_total") == 0
    budget = before.value("medhive_datacache_cache_budget_bytes")
    assert budget == datacache_settings.budget_mb * 1024 * 1024
    data, result = os.urandom(100_000), b"a result of 23 bytes..."
    origin.files["in.bin"] = data

    for job in ("job-a", "job-b"):  # the second one finds the input cached
        await harness.stage(job, f"{origin.url}/in.bin")
        assert (await harness.staged(job))["type"] == "data.staged"
    await harness.stage("job-c", f"{origin.url}/missing.bin")
    assert (await harness.staged("job-c"))["type"] == "data.failed"
    await harness.grant("job-a")
    read = await harness.read("job-a", hashlib.sha256(data).hexdigest())
    assert await read.read() == data
    path = "/v1/jobs/job-a/outputs/result.txt"
    put = await harness.client.put(path, data=result, headers=harness.node_auth)
    assert put.status == 201
    download = await harness.client.get(path, headers=harness.user_auth)
    assert await download.read() == result
    await harness.client.app[EVICTOR].evict_once()  # a round measures the cache

    def settled(s: Scrape) -> bool:
        """Counted once acknowledged and once sent: maybe just after the client saw it."""
        handled = s.value("medhive_messages_handled_total", type="data.stage", outcome="ok")
        served = s.value("medhive_datacache_served_bytes_total")
        return handled == 3 and served == len(data) + len(result)

    after = await scrape_until(url, token, settled)
    assert after.value("medhive_datacache_fetched_bytes_total") == len(data)
    # missing.bin failed at its source's probe, before the cache was looked at
    assert after.value("medhive_datacache_cache_misses_total") == 1
    assert after.value("medhive_datacache_cache_hits_total") == 1
    assert after.value("medhive_datacache_staging_seconds_count", outcome="staged") == 2
    assert after.value("medhive_datacache_staging_seconds_count", outcome="failed") == 1
    assert after.value("medhive_datacache_served_bytes_total", to="node") == len(data)
    assert after.value("medhive_datacache_served_bytes_total", to="tenant") == len(result)
    stored = after.value("medhive_datacache_cache_bytes")
    assert len(data) + len(result) < stored < budget


async def test_metrics_need_a_metrics_or_operator_token_which_reads_nothing_else(
    harness: Harness, mongo_settings: MongoSettings
) -> None:
    url = harness.client.make_url("/metrics")
    metrics = bearer(await make_token(mongo_settings, "_metrics", Role.metrics))
    assert await status_of(url, {}) == 401
    assert await status_of(url, harness.user_auth) == 403
    assert await status_of(url, harness.node_auth) == 403
    assert await status_of(url, metrics) == 200
    inputs = harness.client.make_url("/v1/jobs/job-a/inputs")
    assert await status_of(inputs, metrics) == 403
