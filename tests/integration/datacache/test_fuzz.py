"""The datacache API under schemathesis: no 5xx, nothing the document does not say."""

from __future__ import annotations

from shared.auth import Role
from shared.service import api_document
from shared.settings import MongoSettings
from tests.fuzz import fuzz
from tests.helpers import bearer, make_token
from tests.integration.datacache.conftest import Harness


async def test_the_datacache_api_keeps_to_its_document_under_fuzzing(
    harness: Harness, mongo_settings: MongoSettings
) -> None:
    callers = {
        "user": harness.user_auth,
        "operator": bearer(await make_token(mongo_settings, "ops", Role.operator)),
        "node": harness.node_auth,
        "invalid": bearer("mh_not-a-token"),
    }
    document = api_document(harness.client.app, "datacache")
    base = str(harness.client.make_url("")).rstrip("/")
    assert await fuzz(base, document, callers) == []
