"""The job API under schemathesis: no 5xx, nothing the document does not say."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from shared.auth import Role
from shared.service import api_document
from shared.settings import MongoSettings
from tests.fuzz import fuzz, fuzz_sequences
from tests.helpers import bearer, make_token


async def test_the_job_api_keeps_to_its_document_under_fuzzing(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    callers = {
        "user": bearer(await make_token(mongo_settings, "radiology")),
        "operator": bearer(await make_token(mongo_settings, "ops", Role.operator)),
        "node": bearer(await make_token(mongo_settings, "_nodes", Role.node, name="n1")),
        "invalid": bearer("mh_not-a-token"),
    }
    document = api_document(scheduler.app, "scheduler")
    base = str(scheduler.make_url("")).rstrip("/")
    assert await fuzz(base, document, callers) == []
    # And along the links: a job made, then read, its logs and results, cancelled.
    await fuzz_sequences(base, document, callers["user"])
