"""The audit API under schemathesis: no 5xx, nothing the document does not say."""

from __future__ import annotations

from typing import Any

from shared.auth import Role
from shared.service import api_document
from tests.fuzz import fuzz
from tests.integration.audit.conftest import StartApp
from tests.integration.audit.support import auth


async def test_the_audit_api_keeps_to_its_document_under_fuzzing(
    start_app: StartApp, token: Any
) -> None:
    client = await start_app()
    callers = {
        "user": auth(await token("radiology")),
        "operator": auth(await token("ops", Role.operator)),
        "node": auth(await token("_nodes", Role.node)),
        "invalid": auth("mh_not-a-token"),
    }
    document = api_document(client.app, "audit")
    # A live stream never ends by itself: the fuzzing reads the answers that do.
    del document["paths"]["/v1/events/stream"]
    base = str(client.make_url("")).rstrip("/")
    assert await fuzz(base, document, callers) == []
