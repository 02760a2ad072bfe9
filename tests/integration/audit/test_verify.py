"""Tampering with the stored records is found by `GET /v1/audit/verify`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.audit import store as audit_store
from services.audit.chain import record_hash
from services.audit.store import AuditStore, RecordQuery
from shared.auth import Role
from shared.bus import Bus
from shared.messages.jobs import JobEvent, JobState
from shared.mongo import Document
from tests.integration.audit.conftest import StartApp
from tests.integration.audit.support import auth, rewrite, stored


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

    original = (await stored(records, 8))[3]
    await rewrite(records, 4, lambda record: {**record, "tenant": "t2"})
    changed = await verdict()
    assert (changed["ok"], changed["first_bad_seq"]) == (False, 4)
    assert "hash" in changed["problem"]

    # Rewriting the record's hash too moves the break to the next link.
    forged = {**original, "tenant": "t2"}
    forged["hash"] = record_hash(forged)
    await rewrite(records, 4, lambda record: forged)
    assert (await verdict())["first_bad_seq"] == 5

    await rewrite(records, 4, lambda record: original)
    assert (await verdict())["ok"] is True

    # Hiding records from a job's readers: its block no longer names the job.
    block = await records.blocks.find_one({"ids": original["_id"]})
    assert block is not None
    hidden = [key for key in block["lookup"] if key != f"job:{original['job_id']}"]
    await records.blocks.update_one({"_id": block["_id"]}, {"$set": {"lookup": hidden}})
    misfiled = await verdict()
    assert (misfiled["ok"], misfiled["first_bad_seq"]) == (False, block["_id"])
    assert "lookup" in misfiled["problem"]
    await records.blocks.update_one({"_id": block["_id"]}, {"$set": {"lookup": block["lookup"]}})

    await rewrite(records, 6, lambda record: None)
    deleted = await verdict()
    assert (deleted["ok"], deleted["first_bad_seq"]) == (False, 6)
    assert "missing" in deleted["problem"]


async def test_verify_is_for_operators_only(start_app: StartApp, token: Any) -> None:
    client = await start_app()
    response = await client.get("/v1/audit/verify", headers=auth(await token("t1")))
    assert response.status == 403
    assert "operator" in (await response.json())["error"]["detail"]


async def test_a_store_of_an_older_version_is_moved_into_blocks_at_start(
    start_app: StartApp, bus: Bus, records: AuditStore, token: Any
) -> None:
    """Records kept one per document, as older versions did: at start they move into
    blocks as they are, and are found and verified there."""
    client = await start_app()
    operator = auth(await token("ops", Role.operator))
    for n in range(5):
        event = JobEvent(job_id=f"j-old{n}", state=JobState.running)
        await bus.emit("job.running", event, correlation_id=f"j-old{n}", tenant="t1")
    kept = await stored(records, 5)
    await client.close()
    await records.legacy.insert_many(kept)
    await records.blocks.drop()

    client = await start_app()
    assert await records.legacy.find_one({}) is None
    response = await client.get("/v1/events", params={"job": "j-old3"}, headers=operator)
    assert [r["id"] for r in (await response.json())["events"]] == [kept[3]["_id"]]
    verdict = await (await client.get("/v1/audit/verify", headers=operator)).json()
    assert (verdict["ok"], verdict["records"], verdict["last_hash"]) == (True, 5, kept[-1]["hash"])


async def test_blocks_are_read_window_by_window_without_losing_a_record(
    records: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows of 4 `seq` over blocks of 3, 7, 1, 9 and 5 records: blocks straddle the
    windows' ends, and `upto` falls inside a block."""
    monkeypatch.setattr(audit_store, "WINDOW", 4)
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    seq = 0
    for size in (3, 7, 1, 9, 5):
        block = []
        for _ in range(size):
            seq += 1
            block.append({"_id": f"m{seq}", "seq": seq, "type": "job.running", "tenant": "t1",
                          "job_id": f"j{seq % 2}", "occurred_at": moment})  # fmt: skip
        await records.insert(block)

    def seqs(found: list[Document]) -> list[int]:
        return [record["seq"] for record in found]

    everything = RecordQuery()
    assert seqs(await records.page(everything, after=2, limit=100)) == list(range(3, 26))
    assert seqs(await records.page(everything, after=2, limit=100, upto=15)) == list(range(3, 16))
    assert seqs(await records.page(everything, after=9, limit=5)) == list(range(10, 15))
    odd = await records.page(RecordQuery(job="j1"), after=0, limit=100, upto=25)
    assert seqs(odd) == list(range(1, 26, 2))
    assert [record["seq"] async for record in records.in_seq_order()] == list(range(1, 26))
    assert await records.misfiled() is None
