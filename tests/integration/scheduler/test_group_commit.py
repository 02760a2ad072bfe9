"""Job writes sent in groups: each writer learns its own outcome, and nothing stored is
left unpublished when the scheduler dies between a group's write and its publish."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiohttp.test_utils import TestClient
from pymongo.asynchronous.database import AsyncDatabase

from services.scheduler.api import JOBS, STORE
from services.scheduler.outbox import OutboxRelay
from services.scheduler.store import Change, JobStore, outbox_entry
from shared.auth import Role
from shared.envelope import Envelope, utcnow
from shared.messages.jobs import JobEvent, JobSpec, JobState
from shared.mongo import Document
from shared.service import BUS
from shared.settings import AmqpSettings, MongoSettings
from tests.helpers import bearer, event_tap, eventually, make_token

JOB = {"name": "group", "image": "medhive/busybox:1"}
SPEC = JobSpec.model_validate(JOB)


async def update_commands(store: JobStore) -> int:
    status = await store.jobs.database.client.admin.command("serverStatus")
    return int(status["opcounters"]["update"])


async def test_one_group_tells_each_writer_whether_its_own_guard_held(
    database: AsyncDatabase[Document],
) -> None:
    store = JobStore(database)
    await store.create_indexes()
    ids = [f"j-group-{i}" for i in range(3)]
    for i, job_id in enumerate(ids):
        history = [{"state": "queued", "at": utcnow(), "reason": None}]
        command = {"id": f"command-{i}", "sender": "test"}
        await store.insert_job(job_id, "t", None, SPEC, command, history, [])
    # Another writer changes the middle job behind this store's back.
    await store.jobs.update_one(
        {"_id": ids[1]}, {"$set": {"state": "cancelled"}, "$inc": {"rev": 1}}
    )
    placed = {"state": "dispatched", "at": utcnow(), "reason": "test"}
    before = await update_commands(store)
    written = await asyncio.gather(
        *(
            store.apply(store.recent[job_id], Change({"state": "dispatched"}, [placed], []), set())
            for job_id in ids
        )
    )
    assert await update_commands(store) - before == 1  # three writes, one command
    assert [w is not None for w in written] == [True, False, True]
    stored = {doc["_id"]: doc async for doc in store.jobs.find({})}
    assert [stored[job_id]["state"] for job_id in ids] == [
        "dispatched",
        "cancelled",
        "dispatched",
    ]
    assert [stored[job_id]["rev"] for job_id in ids] == [1, 1, 1]
    assert len(stored[ids[1]]["history"]) == 1  # the refused write left nothing
    # The stale copy is forgotten: the next decision about that job reads it.
    assert ids[1] not in store.recent
    current = await store.current(ids[1])
    assert current is not None and current["state"] == "cancelled"


async def test_a_copy_changed_behind_the_schedulers_back_is_read_again_not_overwritten(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "cardiology", Role.user))
    job = await (await scheduler.post("/v1/jobs", json=JOB, headers=auth)).json()
    store = scheduler.app[STORE]
    assert job["id"] in store.recent
    await store.jobs.update_one(
        {"_id": job["id"]}, {"$set": {"elsewhere": "kept"}, "$inc": {"rev": 1}}
    )
    written = await scheduler.app[JOBS].annotate(job["id"], {"here": "added"})
    assert written is not None
    stored = await store.jobs.find_one({"_id": job["id"]})
    assert stored is not None
    assert (stored["elsewhere"], stored["here"], stored["rev"]) == ("kept", "added", 2)


async def test_duplicate_submissions_in_one_group_make_one_job(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "cardiology", Role.user))
    spec = {**JOB, "idempotency_key": "ris-group"}
    answers = await asyncio.gather(
        *(scheduler.post("/v1/jobs", json=spec, headers=auth) for _ in range(4))
    )
    assert sorted(a.status for a in answers) == [200, 200, 200, 201]
    assert len({(await a.json())["id"] for a in answers}) == 1


async def test_a_group_stored_but_not_published_is_published_by_the_next_start(
    scheduler: TestClient, mongo_settings: MongoSettings, amqp_settings: AmqpSettings
) -> None:
    """As if the scheduler died right after a group's write: the messages it stored are
    published when a scheduler starts next, then dropped from the outboxes."""
    auth = bearer(await make_token(mongo_settings, "cardiology", Role.user))
    created = [
        await (await scheduler.post("/v1/jobs", json=JOB, headers=auth)).json() for _ in range(3)
    ]
    store, bus = scheduler.app[STORE], scheduler.app[BUS]
    stored: list[Document] = []
    for job in created:
        event = JobEvent(job_id=job["id"], state=JobState.cancelled,
                         previous_state=JobState.queued, reason="test", attempt=0)  # fmt: skip
        envelope = bus.envelope(
            "job.cancelled", event, correlation_id=job["id"], tenant="cardiology"
        )
        stored.append(outbox_entry(envelope))
    current = [store.recent[job["id"]] for job in created]
    changes = [
        Change({"state": "cancelled"}, [{"state": "cancelled", "at": utcnow()}], [entry])
        for entry in stored
    ]
    async with event_tap(amqp_settings, ["job.cancelled"]) as tap:
        written = await asyncio.gather(
            *(store.apply(job, change, set()) for job, change in zip(current, changes, strict=True))
        )
        assert all(w is not None for w in written)  # stored, never published: the "crash"
        restarted = OutboxRelay(JobStore(store.jobs.database), bus)
        await restarted.start()
        try:
            for entry_id in [entry["id"] for entry in stored]:
                await tap.wait_for(lambda m, wanted=entry_id: bool(m["id"] == wanted))
        finally:
            await restarted.stop()

    async def outboxes_emptied() -> bool:
        cursor = store.jobs.find({"_id": {"$in": [j["id"] for j in created]}})
        docs: list[dict[str, Any]] = await cursor.to_list()
        return all(not d["outbox"] and "outbox_at" not in d for d in docs)

    await eventually(outboxes_emptied)


async def test_a_store_of_an_older_version_is_taken_over_at_start(
    scheduler: TestClient, mongo_settings: MongoSettings, amqp_settings: AmqpSettings
) -> None:
    """Jobs written before the claims and the stored message bodies: their keys are
    claimed and the retired indexes dropped at start, a repeat of an old command finds
    its job, and an outbox entry kept as a document is still published."""
    store, bus = scheduler.app[STORE], scheduler.app[BUS]
    jobs = store.jobs
    await jobs.create_index(
        [("command.sender", 1), ("command.id", 1)],
        unique=True,
        partialFilterExpression={"command.sender": {"$type": "string"}},
    )
    await jobs.create_index([("tenant", 1), ("_id", -1)])
    event = JobEvent(job_id="j-old", state=JobState.queued, previous_state=JobState.submitted,
                     reason=None, attempt=0)  # fmt: skip
    envelope = bus.envelope("job.queued", event, correlation_id="j-old", tenant="cardiology")
    now = utcnow()
    await jobs.insert_one({
        "_id": "j-old", "tenant": "cardiology", "actor": "ris", "name": JOB["name"],
        "spec": SPEC.model_dump(mode="json"), "priority": 0, "state": "queued",
        "history": [{"state": "queued", "at": now, "reason": None}], "attempt": 0,
        "node_id": None, "command": {"id": "ris-17", "sender": "ris"},
        "created_at": now, "updated_at": now, "rev": 0, "outbox_at": now,
        "outbox": [{"id": str(envelope.id), "envelope": envelope.model_dump(mode="json"),
                    "node": None}],
    })  # fmt: skip
    async with event_tap(amqp_settings, ["job.queued"]) as tap:
        restarted = JobStore(store.jobs.database)
        await restarted.create_indexes()
        relay = OutboxRelay(restarted, bus)
        await relay.start()
        try:
            await tap.wait_for(lambda m: bool(m["id"] == str(envelope.id)))
        finally:
            await relay.stop()
    names = set(await jobs.index_information())
    assert not names & {"dedup_1", "command.sender_1_command.id_1", "tenant_1__id_-1"}
    command = {"id": "ris-17", "sender": "ris"}
    assert await restarted.claim("j-new", "cardiology", command, None) == "j-old"
    repeat = await restarted.repeated("j-old", "cardiology", SPEC, command)
    assert repeat is not None
    assert (repeat.created, repeat.job["_id"], repeat.matched_by) == (False, "j-old", "message_id")


async def test_a_store_whose_keys_are_a_unique_index_of_the_jobs_is_taken_over_at_start(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    """The previous version kept each job's keys in its `dedup` field, unique: they are
    claimed at start (one of them already was, by a start that died before the end)
    and the index dropped, and a repeat still finds its job."""
    auth = bearer(await make_token(mongo_settings, "cardiology", Role.user))
    specs = [{**JOB, "idempotency_key": f"ris-before-{i}"} for i in range(2)]
    jobs = [await (await scheduler.post("/v1/jobs", json=s, headers=auth)).json() for s in specs]
    keys = [f'["idempotency", "cardiology", "ris-before-{i}"]' for i in range(2)]
    store = scheduler.app[STORE]
    await store.claims.delete_many({"_id": keys[1]})  # as the previous version stored it
    for job, key in zip(jobs, keys, strict=True):
        await store.jobs.update_one({"_id": job["id"]}, {"$set": {"dedup": [key]}})
    await store.jobs.create_index("dedup", unique=True)
    restarted = JobStore(store.jobs.database)
    await restarted.create_indexes()
    assert "dedup_1" not in await store.jobs.index_information()
    for job, key in zip(jobs, keys, strict=True):
        assert await store.claims.find_one({"_id": key}) == {"_id": key, "job": job["id"]}
    again = await scheduler.post("/v1/jobs", json=specs[1], headers=auth)
    assert (again.status, (await again.json())["id"]) == (200, jobs[1]["id"])


async def test_a_claim_whose_job_was_never_stored_is_honoured_by_the_next_submission(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    """As if a scheduler died between claiming a key and storing its job: the next
    submission with that key stores the job under the claimed id, once."""
    auth = bearer(await make_token(mongo_settings, "cardiology", Role.user))
    store = scheduler.app[STORE]
    key = '["idempotency", "cardiology", "ris-orphan"]'
    await store.claims.insert_one({"_id": key, "job": "j-claimed"})
    spec = {**JOB, "idempotency_key": "ris-orphan"}
    first = await scheduler.post("/v1/jobs", json=spec, headers=auth)
    again = await scheduler.post("/v1/jobs", json=spec, headers=auth)
    assert (first.status, (await first.json())["id"]) == (201, "j-claimed")
    assert (again.status, (await again.json())["id"]) == (200, "j-claimed")
    assert await store.jobs.count_documents({"idempotency_key": "ris-orphan"}) == 1


async def test_a_request_without_an_idempotency_key_claims_nothing(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    """Its command id is made for it here and cannot come again: a claim would be a
    write per job for nothing."""
    auth = bearer(await make_token(mongo_settings, "cardiology", Role.user))
    answers = [await scheduler.post("/v1/jobs", json=JOB, headers=auth) for _ in range(2)]
    assert [a.status for a in answers] == [201, 201]
    assert await scheduler.app[STORE].claims.count_documents({}) == 0


async def test_a_write_that_empties_the_outbox_unmarks_the_job_only_where_its_guard_held(
    database: AsyncDatabase[Document],
) -> None:
    store = JobStore(database)
    await store.create_indexes()
    event = JobEvent(job_id="j-mark", state=JobState.queued, previous_state=None,
                     reason=None, attempt=0)  # fmt: skip
    envelope = Envelope(id=uuid.uuid4(), type="job.queued", payload=event.model_dump(mode="json"))
    entries = [outbox_entry(envelope)]
    for i, job_id in enumerate(["j-mark", "j-stale"]):
        history = [{"state": "queued", "at": utcnow(), "reason": None}]
        command = {"id": f"mark-{i}", "sender": "test"}
        await store.insert_job(job_id, "t", None, SPEC, command, history, entries)
    stale = dict(store.recent["j-stale"])
    await store.jobs.update_one({"_id": "j-stale"}, {"$inc": {"rev": 1}})
    published = {entries[0]["id"]}
    note = Change({"note": "seen"}, [], [])
    assert await store.apply(store.recent["j-mark"], note, published) is not None
    assert await store.apply(stale, note, published) is None
    marked = await store.jobs.find_one({"_id": "j-mark"})
    kept = await store.jobs.find_one({"_id": "j-stale"})
    assert marked is not None and kept is not None
    assert (marked["outbox"], "outbox_at" in marked, marked["note"]) == ([], False, "seen")
    assert (len(kept["outbox"]), "outbox_at" in kept, "note" in kept) == (1, True, False)


async def test_a_job_marked_with_an_empty_outbox_is_unmarked_by_the_sweep(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    """An older version could leave a job marked for the sweep with nothing to publish:
    the sweep unmarks it."""
    auth = bearer(await make_token(mongo_settings, "cardiology", Role.user))
    job = await (await scheduler.post("/v1/jobs", json=JOB, headers=auth)).json()
    store, bus = scheduler.app[STORE], scheduler.app[BUS]
    await store.jobs.update_one({"_id": job["id"]}, {"$set": {"outbox": [], "outbox_at": utcnow()}})
    relay = OutboxRelay(JobStore(store.jobs.database), bus)
    assert await relay.sweep(settled_s=0) == 0
    stored = await store.jobs.find_one({"_id": job["id"]})
    assert stored is not None and "outbox_at" not in stored
