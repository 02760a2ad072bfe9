"""Tampering with the stored records is found by `GET /v1/audit/verify`."""

from __future__ import annotations

from typing import Any

from services.audit.chain import record_hash
from shared.auth import Role
from shared.bus import Bus
from shared.messages.jobs import JobEvent, JobState
from tests.integration.audit.conftest import StartApp
from tests.integration.audit.support import auth, stored


async def test_verify_reports_the_first_changed_or_missing_record(
    start_app: StartApp, bus: Bus, records: Any, token: Any
) -> None:
    client = await start_app()
    operator = auth(await token("ops", Role.operator))
    for n in range(8):
        event = JobEvent(job_id=f"j{n}", state=JobState.running)
        await bus.emit("job.running", event, correlation_id=f"j{n}", tenant="t1")
    await stored(records, 8)

    async def verdict() -> dict[str, Any]:
        response = await client.get("/v1/audit/verify", headers=operator)
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body

    untouched = await verdict()
    assert (untouched["ok"], untouched["records"], untouched["first_bad_seq"]) == (True, 8, None)
    assert untouched["last_seq"] == 8

    original = await records.find_one({"seq": 4})
    await records.update_one({"seq": 4}, {"$set": {"tenant": "t2"}})
    changed = await verdict()
    assert (changed["ok"], changed["first_bad_seq"]) == (False, 4)
    assert "hash" in changed["problem"]

    # Rewriting the record's hash too moves the break to the next link.
    forged = {**original, "tenant": "t2"}
    forged["hash"] = record_hash(forged)
    await records.replace_one({"seq": 4}, forged)
    assert (await verdict())["first_bad_seq"] == 5

    await records.replace_one({"seq": 4}, original)
    assert (await verdict())["ok"] is True

    await records.delete_one({"seq": 6})
    deleted = await verdict()
    assert (deleted["ok"], deleted["first_bad_seq"]) == (False, 6)
    assert "missing" in deleted["problem"]


async def test_verify_is_for_operators_only(start_app: StartApp, token: Any) -> None:
    client = await start_app()
    response = await client.get("/v1/audit/verify", headers=auth(await token("t1")))
    assert response.status == 403
    assert "operator" in (await response.json())["error"]["detail"]
