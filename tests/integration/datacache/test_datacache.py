"""The datacache as a service: staging, dedup, grants, serving, at-rest encryption,
quarantine, eviction, results and restarts; with a real HTTP origin (and the XNAT
stand-in, for a study of many files) as sources."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from services.datacache.api import STORE
from services.datacache.app import EVICTOR, STAGER
from services.datacache.settings import DatacacheSettings
from services.vmnode.jobdata import DataUnavailable, JobData
from services.vmnode.settings import NodeSettings
from shared.auth import TokenStore
from shared.envelope import utcnow
from shared.messages.data import InputSpec
from shared.messages.jobs import JobSpec, NodeRun
from shared.mongo import connect
from shared.sealed import DATA_KEY_HEADER, SIZE_HEADER, Opener, read_header
from shared.service import MONGO
from shared.settings import MongoSettings
from tests.fixtures.xnat import Xnat
from tests.helpers import bearer, lease_renewed
from tests.integration.datacache.conftest import Harness
from tests.integration.datacache.http_origin import Origin

MIB = 1024 * 1024


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _staged_ok(h: Harness, job_id: str, *sources: str) -> dict[str, Any]:
    await h.stage(job_id, *sources)
    event = await h.staged(job_id)
    assert event["type"] == "data.staged", event["payload"]
    return event


async def _staged_input(harness: Harness, origin: Origin, size: int) -> bytes:
    """`size` random bytes at the origin (as `ct.bin`), staged for job-1."""
    data = os.urandom(size)
    origin.files["ct.bin"] = data
    await _staged_ok(harness, "job-1", f"{origin.url}/ct.bin")
    return data


async def test_a_staged_input_is_read_by_the_granted_node_byte_for_byte(
    harness: Harness, origin: Origin
) -> None:
    data = os.urandom(3 * MIB + 7)
    origin.files["ct.bin"] = data
    staged = await _staged_ok(harness, "job-1", f"{origin.url}/ct.bin")
    assert staged["payload"]["inputs"][0]["bytes"] == len(data)
    fetched = harness.events.of_job("job-1", "data.fetched")
    assert fetched[0]["payload"]["source"] == f"{origin.url}/ct.bin"
    assert fetched[0]["tenant"] == "radiology"
    assert "origin-token" not in str(harness.events.messages)

    granted = await harness.grant("job-1")
    assert granted["type"] == "data.granted" and granted["payload"]["objects"] == 1
    manifest = await (await harness.inputs("job-1")).json()
    files = manifest["inputs"][0]["files"]
    assert files == [{"path": "ct.bin", "sha256": _sha(data), "size": len(data)}]
    response = await harness.read("job-1", _sha(data))
    assert response.status == 200
    assert await response.read() == data
    partial = await harness.read("job-1", _sha(data), Range="bytes=1048570-1048580")
    assert partial.status == 206
    assert await partial.read() == data[1048570:1048581]
    access = await harness.events.wait_for(lambda m: m["type"] == "data.accessed")
    assert access["payload"]["bytes"] == len(data)
    assert access["payload"]["node_id"] == "node-1"


async def test_nothing_of_a_staged_input_is_readable_at_rest(
    harness: Harness, origin: Origin, datacache_settings: DatacacheSettings
) -> None:
    data = await _staged_input(harness, origin, 2 * MIB)
    windows = [data[i : i + 16] for i in range(0, len(data) - 16, 4093)]
    stored = [p for p in Path(datacache_settings.cache_dir).rglob("*") if p.is_file()]
    assert stored
    for path in stored:
        content = path.read_bytes()
        assert not any(window in content for window in windows), path
        assert _sha(data) not in path.name


async def test_the_second_job_on_a_source_fetches_nothing(harness: Harness, origin: Origin) -> None:
    origin.files["study.bin"] = os.urandom(MIB)
    await _staged_ok(harness, "job-1", f"{origin.url}/study.bin")
    body_before = origin.body_bytes
    second = await _staged_ok(harness, "job-2", f"{origin.url}/study.bin")
    assert second["payload"]["cached"] == 1
    assert origin.body_bytes == body_before
    assert origin.requests["GET"] == 1


async def test_a_cached_source_whose_object_file_is_gone_is_fetched_again(
    harness: Harness, origin: Origin, datacache_settings: DatacacheSettings
) -> None:
    data = origin.files["study.bin"] = os.urandom(MIB)
    await _staged_ok(harness, "job-1", f"{origin.url}/study.bin")
    [blob] = (datacache_settings.cache_dir / "objects").iterdir()
    blob.unlink()  # lost from the disk behind the catalog's back
    second = await _staged_ok(harness, "job-2", f"{origin.url}/study.bin")
    assert second["payload"]["cached"] == 0
    assert origin.requests["GET"] == 2
    lost = await harness.events.wait_for(lambda m: m["type"] == "data.quarantined")
    assert lost["payload"]["object"] == _sha(data) and "gone" in lost["payload"]["reason"]
    # The fresh copy took the lost one's place: the job reads it.
    await harness.grant("job-2")
    assert await (await harness.read("job-2", _sha(data))).read() == data


async def test_concurrent_jobs_on_one_source_share_one_fetch(
    harness: Harness, origin: Origin
) -> None:
    origin.files["study.bin"] = os.urandom(MIB)
    origin.gate = asyncio.Event()
    await harness.stage("job-1", f"{origin.url}/study.bin")
    await origin.started.wait()
    await harness.stage("job-2", f"{origin.url}/study.bin")
    await harness.events.wait_for(lambda m: m["type"] == "data.progress")
    origin.gate.set()
    for job in ("job-1", "job-2"):
        assert (await harness.staged(job))["type"] == "data.staged"
    assert origin.requests["GET"] == 1


async def test_a_source_failing_twice_is_retried(harness: Harness, origin: Origin) -> None:
    origin.files["a.bin"] = b"x" * 1000
    origin.fail_next = 2  # three tries are allowed
    staged = await _staged_ok(harness, "job-1", f"{origin.url}/a.bin")
    assert staged["payload"]["inputs"][0]["bytes"] == 1000
    fetched = harness.events.of_job("job-1", "data.fetched")[0]
    assert fetched["payload"]["attempts"] == 3


async def test_a_source_that_stays_down_fails_the_staging_naming_it(
    harness: Harness, origin: Origin
) -> None:
    origin.files["a.bin"] = b"x"
    origin.fail_next = 100
    await harness.stage("job-1", f"{origin.url}/a.bin")
    failed = await harness.staged("job-1")
    assert failed["type"] == "data.failed"
    assert f"{origin.url}/a.bin" in failed["payload"]["reason"]
    assert "after 3 tries" in failed["payload"]["reason"]
    assert failed["payload"]["source"] == f"{origin.url}/a.bin"


async def test_a_source_not_configured_for_the_tenant_is_refused(harness: Harness) -> None:
    await harness.stage("job-1", "https://elsewhere.example/a")
    failed = await harness.staged("job-1")
    assert failed["type"] == "data.failed"
    assert "no source configured for tenant 'radiology'" in failed["payload"]["reason"]


async def test_reads_without_a_live_grant_are_refused_and_recorded(
    harness: Harness, origin: Origin
) -> None:
    secret, other = os.urandom(1000), os.urandom(1000)
    origin.files["mine.bin"], origin.files["theirs.bin"] = secret, other
    await _staged_ok(harness, "job-1", f"{origin.url}/mine.bin")
    await harness.stage("job-9", f"{origin.url}/theirs.bin", tenant="cardiology")
    await harness.staged("job-9")
    await harness.grant("job-9", node="node-1", tenant="cardiology")

    denied = await harness.read("job-1", _sha(secret))
    assert denied.status == 403
    assert "no grant for job job-1" in (await denied.json())["error"]["detail"]
    await harness.grant("job-1")
    # another node, another job's grant, another tenant's object, a user's token
    cases = [
        (await harness.read("job-1", _sha(secret), harness.other_node_auth), "node-1, not node-2"),
        (await harness.read("job-9", _sha(secret)), "not part of job job-9"),
        (await harness.read("job-1", _sha(other)), "not part of job job-1"),
        (await harness.read("job-1", _sha(secret), harness.user_auth), "only node agents"),
    ]
    for response, reason in cases:
        assert response.status == 403
        assert reason in (await response.json())["error"]["detail"]
    expired = await harness.grant("job-1", seconds=-1, attempt=2)
    assert expired["type"] == "data.granted"
    response = await harness.read("job-1", _sha(secret))
    assert response.status == 403 and "expired" in (await response.json())["error"]["detail"]

    await harness.release("job-1")
    response = await harness.read("job-1", _sha(secret))
    assert response.status == 403 and "revoked" in (await response.json())["error"]["detail"]
    await harness.events.wait_for(
        lambda m: m["type"] == "data.denied" and "revoked" in m["payload"]["reason"]
    )
    denials = [m for m in harness.events.messages if m["type"] == "data.denied"]
    assert len(denials) == 7
    assert all(d["payload"]["reason"] for d in denials)


async def test_a_delegated_token_reaches_its_grant_only_and_dies_with_it(
    harness: Harness, origin: Origin, mongo_settings: MongoSettings
) -> None:
    """What a node hands to a task it runs on another host (a Swarm stager): its access
    to one grant, nothing more, for no longer than the grant."""
    data, other = os.urandom(1000), os.urandom(1000)
    origin.files["d.bin"], origin.files["e.bin"] = data, other
    await _staged_ok(harness, "job-d", f"{origin.url}/d.bin")
    await _staged_ok(harness, "job-e", f"{origin.url}/e.bin")
    await harness.grant("job-d")
    await harness.grant("job-e")  # the same node holds another job's grant
    made = await harness.client.post("/v1/jobs/job-d/delegates", headers=harness.node_auth)
    assert made.status == 201
    view = await made.json()
    assert view["grant"] == "job-d:1" and view["token"].startswith("mhd_")
    delegate = bearer(view["token"])

    assert (await harness.inputs("job-d", delegate)).status == 200
    read = await harness.read("job-d", _sha(data), delegate)
    assert read.status == 200 and await read.read() == data
    stored = await harness.client.post(
        "/v1/jobs/job-d/outputs/out.txt", data=b"a result", headers=delegate
    )
    assert stored.status == 201 and (await stored.json())["sha256"] == _sha(b"a result")
    written = await harness.events.wait_for(
        lambda m: m["type"] == "data.accessed" and m["payload"].get("operation") == "write"
    )
    assert written["payload"]["node_id"] == "node-1" and written["correlation_id"] == "job-d"

    refusals = [
        (await harness.read("job-e", _sha(other), delegate), "reaches grant job-d:1 only"),
        (await harness.inputs("job-e", delegate), "reaches grant job-d:1 only"),
        (await harness.client.post("/v1/jobs/job-d/delegates", headers=delegate), "cannot"),
    ]
    for response, reason in refusals:
        assert response.status == 403
        assert reason in (await response.json())["error"]["detail"]
    async with connect(mongo_settings) as client:  # unknown to every other service
        assert await TokenStore(client[mongo_settings.identity_db]).verify(view["token"]) is None

    await harness.grant("job-d", attempt=2)  # a new attempt supersedes the token's grant
    response = await harness.inputs("job-d", delegate)
    assert response.status == 403
    assert "reaches grant job-d:1 only" in (await response.json())["error"]["detail"]
    await harness.release("job-d")
    response = await harness.inputs("job-d", delegate)
    assert response.status == 403 and "revoked" in (await response.json())["error"]["detail"]


async def _granted_input(harness: Harness, origin: Origin, size: int) -> bytes:
    """`size` random bytes at the origin, staged for job-1 and granted to node-1."""
    data = await _staged_input(harness, origin, size)
    await harness.grant("job-1")
    return data


def _node(harness: Harness, work_dir: Path) -> JobData:
    """The node agent's data code, as node-1, against the datacache under test."""
    token = harness.node_auth["Authorization"].removeprefix("Bearer ")
    return JobData(
        NodeSettings(
            node_id="node-1",
            datacache_url=str(harness.client.make_url("/")),
            datacache_token=SecretStr(token),
            work_dir=work_dir,
        )
    )


def _node_run(job_id: str, source: str) -> NodeRun:
    spec = JobSpec(
        name="reads",
        image="medhive/busybox:1",
        inputs=[InputSpec(name="in0", source=source, path="/data/in0")],  # as `stage` names it
    )
    return NodeRun(
        job_id=job_id,
        attempt=1,
        tenant="radiology",
        spec=spec,
        deadline=utcnow() + timedelta(hours=1),
    )


async def test_a_node_opens_the_sealed_object_itself_with_the_key_it_is_sent(
    harness: Harness, origin: Origin, datacache_settings: DatacacheSettings
) -> None:
    data = await _granted_input(harness, origin, 3 * MIB + 11)
    response = await harness.client.get(
        f"/v1/jobs/job-1/objects/{_sha(data)}/sealed", headers=harness.node_auth
    )
    assert response.status == 200
    sealed = await response.read()
    # As stored: the file on disk, byte for byte, not the plaintext.
    [blob] = (datacache_settings.cache_dir / "objects").iterdir()
    assert sealed == blob.read_bytes() and data not in sealed
    assert int(response.headers[SIZE_HEADER]) == len(data)
    key = base64.b64decode(response.headers[DATA_KEY_HEADER])
    stream = io.BytesIO(sealed)

    opener = Opener.with_key(read_header(stream.read), key)
    last = opener.segments(len(sealed)) - 1
    assert b"".join(opener.open_run(stream.read(), 0, last + 1, last)) == data
    access = await harness.events.wait_for(lambda m: m["type"] == "data.accessed")
    assert access["payload"]["bytes"] == len(data)
    assert access["payload"]["node_id"] == "node-1"
    assert _b64(key) not in str(harness.events.messages)  # the key is in no event


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@pytest.mark.parametrize(
    ("size", "tampered_from_end"),
    [
        (9 * MIB + 3, 2 * MIB),  # more than a node batch: a segment after the first batch
        (300_001, 100_000),  # an instance's size: read whole, placed in one step
    ],
)
async def test_the_node_places_an_input_it_opened_and_refuses_a_tampered_one(
    harness: Harness,
    origin: Origin,
    datacache_settings: DatacacheSettings,
    tmp_path: Path,
    size: int,
    tampered_from_end: int,
) -> None:
    data = await _granted_input(harness, origin, size)
    node, run = _node(harness, tmp_path / "jobs"), _node_run("job-1", f"{origin.url}/ct.bin")
    try:
        [mount] = await node.prepare(run)
        assert (mount.source / "ct.bin").read_bytes() == data
        await node.wipe("job-1", 1)

        [blob] = (datacache_settings.cache_dir / "objects").iterdir()
        raw = bytearray(blob.read_bytes())
        raw[len(raw) - tampered_from_end] ^= 0x01
        blob.write_bytes(bytes(raw))
        with pytest.raises(DataUnavailable, match=r"failed authentication.*quarantined"):
            await node.prepare(run)
    finally:
        await node.wipe("job-1", 1)
        await node.close()
    event = await harness.events.wait_for(lambda m: m["type"] == "data.quarantined")
    assert event["payload"]["object"] == _sha(data)
    assert not blob.exists()
    again = await harness.read("job-1", _sha(data))
    assert again.status == 410
    # Refused from the catalog at once, although it was read moments before: not
    # looked for in the store again (and quarantined a second time).
    denied = await harness.events.wait_for(lambda m: m["type"] == "data.denied", within=10)
    assert "quarantined" in denied["payload"]["reason"]


@pytest.mark.parametrize("size", [3 * MIB + 5, 300_001])  # streamed, and read whole
async def test_an_input_the_datacache_cannot_send_fails_the_node_with_its_reason(
    harness: Harness,
    origin: Origin,
    datacache_settings: DatacacheSettings,
    tmp_path: Path,
    size: int,
) -> None:
    await _granted_input(harness, origin, size)
    [blob] = (datacache_settings.cache_dir / "objects").iterdir()
    blob.unlink()  # lost from the cache's disk after the grant
    node, run = _node(harness, tmp_path / "jobs"), _node_run("job-1", f"{origin.url}/ct.bin")
    try:
        refused = r"refused ct\.bin: object \w+ failed .*quarantined"
        with pytest.raises(DataUnavailable, match=refused):
            await node.prepare(run)
    finally:
        await node.wipe("job-1", 1)
        await node.close()


async def _queries(harness: Harness) -> int:
    database = harness.client.app[STORE].objects.database
    status = await database.client.admin.command("serverStatus")
    return int(status["opcounters"]["query"])


async def test_a_node_reading_a_study_costs_a_catalog_query_per_many_objects(
    harness: Harness, origin: Origin
) -> None:
    """A study is thousands of small objects, each read by its own request: the grant's
    objects are looked up together, not one query each."""
    instances = {f"{i:03}.dcm": os.urandom(1000 + i) for i in range(60)}
    origin.files.update(instances)
    await _staged_ok(harness, "job-1", *(f"{origin.url}/{name}" for name in instances))
    await harness.grant("job-1")
    before = await _queries(harness)
    for data in instances.values():
        response = await harness.client.get(
            f"/v1/jobs/job-1/objects/{_sha(data)}/sealed", headers=harness.node_auth
        )
        assert response.status == 200
        await response.read()
    assert await _queries(harness) - before < 10  # one each was 60


async def test_a_second_job_on_a_study_finds_it_cached_in_a_query_per_many_objects(
    make_harness: Any, datacache_settings: DatacacheSettings, xnat_server: Xnat, tmp_path: Path
) -> None:
    """Before a cached study is used again, each of its objects is checked to be held
    and sound: together, not a query each."""
    for i in range(60):
        xnat_server.add_file("P1", "S1", "E1", "2", "DICOM", f"{i:03}.dcm", os.urandom(1000 + i))
    sources = tmp_path / "xnat-sources.json"
    sources.write_text(json.dumps([{
        "tenant": "radiology", "match": "xnat://xnat.example", "base_url": xnat_server.url,
        "username": xnat_server.username, "password": xnat_server.password,
    }]))  # fmt: skip
    harness = await make_harness(datacache_settings.model_copy(update={"sources_file": sources}))
    scan = "xnat://xnat.example/projects/P1/subjects/S1/experiments/E1/scans/2/resources/DICOM"
    await _staged_ok(harness, "job-1", scan)
    before = await _queries(harness)
    again = await _staged_ok(harness, "job-2", scan)
    assert again["payload"]["cached"] == 1
    assert await _queries(harness) - before < 20  # a query each was 60 more


@pytest.mark.parametrize("route", ["", "/sealed"])
@pytest.mark.parametrize("damage", ["file gone", "header broken"])
async def test_an_object_damaged_before_a_byte_is_sent_is_refused_with_410_and_quarantined(
    harness: Harness,
    origin: Origin,
    datacache_settings: DatacacheSettings,
    route: str,
    damage: str,
) -> None:
    data = await _granted_input(harness, origin, 2 * MIB)
    [blob] = (datacache_settings.cache_dir / "objects").iterdir()
    if damage == "file gone":
        blob.unlink()
    else:
        blob.write_bytes(b"XXXX" + blob.read_bytes()[4:])
    url = f"/v1/jobs/job-1/objects/{_sha(data)}{route}"
    response = await harness.client.get(url, headers=harness.node_auth)
    assert response.status == 410
    assert "quarantined" in (await response.json())["error"]["detail"]
    event = await harness.events.wait_for(lambda m: m["type"] == "data.quarantined")
    assert event["payload"]["object"] == _sha(data)
    assert (await harness.client.get(url, headers=harness.node_auth)).status == 410


async def test_a_damage_report_on_a_sound_object_quarantines_nothing(
    harness: Harness, origin: Origin, datacache_settings: DatacacheSettings
) -> None:
    data = await _granted_input(harness, origin, 2 * MIB)
    report = await harness.client.post(
        f"/v1/jobs/job-1/objects/{_sha(data)}/damaged", headers=harness.node_auth
    )
    assert report.status == 200
    assert (await report.json())["quarantined"] is False
    assert len(list((datacache_settings.cache_dir / "objects").iterdir())) == 1
    assert await (await harness.read("job-1", _sha(data))).read() == data
    assert not [m for m in harness.events.messages if m["type"] == "data.quarantined"]


async def test_a_tampered_object_is_refused_quarantined_and_reported(
    harness: Harness, origin: Origin, datacache_settings: DatacacheSettings
) -> None:
    data = await _granted_input(harness, origin, 3 * MIB)
    [blob] = [p for p in (datacache_settings.cache_dir / "objects").iterdir()]
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    blob.write_bytes(bytes(raw))

    response = await harness.read("job-1", _sha(data))
    body = b""
    with contextlib.suppress(aiohttp.ClientPayloadError):  # the transfer is cut short
        body = await response.read()
    assert body != data
    event = await harness.events.wait_for(lambda m: m["type"] == "data.quarantined")
    assert event["payload"]["object"] == _sha(data)
    assert not blob.exists()
    assert list((datacache_settings.cache_dir / "quarantine").iterdir())
    again = await harness.read("job-1", _sha(data))
    assert again.status == 410
    # The next staging of that source fetches it anew.
    await _staged_ok(harness, "job-2", f"{origin.url}/ct.bin")
    assert origin.requests["GET"] == 2


async def test_eviction_keeps_what_live_grants_and_stagings_name(
    make_harness: Any, origin: Origin, datacache_settings: DatacacheSettings
) -> None:
    settings = datacache_settings.model_copy(update={"budget_mb": 1})
    harness: Harness = await make_harness(settings)
    for name in ("a", "b", "c"):
        origin.files[name] = os.urandom(MIB)
        await _staged_ok(harness, f"job-{name}", f"{origin.url}/{name}")
    await harness.grant("job-b")
    await harness.release("job-a")
    await harness.release("job-c")
    evicted = await harness.client.app[EVICTOR].evict_once()
    assert set(evicted) == {_sha(origin.files["a"]), _sha(origin.files["c"])}
    response = await harness.read("job-b", _sha(origin.files["b"]))
    assert await response.read() == origin.files["b"]


async def test_a_restart_during_a_fetch_still_stages_the_job(
    make_harness: Any, origin: Origin
) -> None:
    data = os.urandom(3 * MIB)
    origin.files["a.bin"] = data
    origin.gate = asyncio.Event()
    first: Harness = await make_harness()
    await first.stage("job-1", f"{origin.url}/a.bin")
    await origin.started.wait()
    await first.client.close()  # the datacache stops mid-fetch
    origin.gate.set()
    second: Harness = await make_harness()
    assert (await second.staged("job-1"))["type"] == "data.staged"
    await second.grant("job-1")
    assert await (await second.read("job-1", _sha(data))).read() == data
    assert not second.client.app[STAGER].in_use


async def test_a_standby_datacache_waits_then_takes_over_a_cut_staging(
    make_harness: Any, origin: Origin, datacache_settings: DatacacheSettings
) -> None:
    """Two instances on one catalog and cache directory: the second stands by (serves
    nothing, stages nothing) while the first holds the lease, then takes over."""
    data = os.urandom(3 * MIB)
    origin.files["a.bin"] = data
    origin.gate = asyncio.Event()

    def instance(name: str) -> DatacacheSettings:
        return datacache_settings.model_copy(update={"instance": name, "lease_s": 0.6})

    active: Harness = await make_harness(instance("a"))
    await active.stage("job-1", f"{origin.url}/a.bin")
    await origin.started.wait()
    standby = asyncio.create_task(make_harness(instance("b")))
    leases = active.client.app[MONGO][datacache_settings.database]["leases"]
    await lease_renewed(leases, "datacache", times=2)
    assert not standby.done()  # it tried all along, and waits
    await active.client.close()  # the active one stops mid-fetch and hands over
    origin.gate.set()
    second: Harness = await asyncio.wait_for(standby, 30)
    assert (await second.staged("job-1"))["type"] == "data.staged"
    await second.grant("job-1")
    assert await (await second.read("job-1", _sha(data))).read() == data


async def test_results_are_stored_encrypted_and_downloaded_by_the_tenant_only(
    harness: Harness, origin: Origin, mongo_settings: Any
) -> None:
    from tests.helpers import bearer, make_token

    await harness.grant("job-1")  # a job with outputs only: no staging
    result = os.urandom(100_000)
    put = await harness.client.put(
        "/v1/jobs/job-1/outputs/seg/mask.nii", data=result, headers=harness.node_auth
    )
    assert put.status == 201
    refused = await harness.client.put(
        "/v1/jobs/job-1/outputs/x", data=b"x", headers=harness.other_node_auth
    )
    assert refused.status == 403
    listing = await (
        await harness.client.get("/v1/jobs/job-1/outputs", headers=harness.user_auth)
    ).json()
    assert listing["files"] == [{"path": "seg/mask.nii", "sha256": _sha(result), "size": 100_000}]
    got = await harness.client.get("/v1/jobs/job-1/outputs/seg/mask.nii", headers=harness.user_auth)
    assert await got.read() == result
    other = bearer(await make_token(mongo_settings, "cardiology"))
    theirs = await harness.client.get("/v1/jobs/job-1/outputs/seg/mask.nii", headers=other)
    assert theirs.status == 404

    await harness.release("job-1", upload_to=f"{origin.url}/results/job-1")
    outputs = await harness.events.wait_for(lambda m: m["type"] == "data.outputs")
    assert outputs["payload"]["files"][0]["path"] == "seg/mask.nii"
    uploaded = await harness.events.wait_for(lambda m: m["type"] == "data.uploaded")
    assert uploaded["payload"]["ok"], uploaded["payload"]["detail"]
    assert origin.uploads == {"results/job-1/seg/mask.nii": result}


async def test_objects_unused_past_their_ttl_are_evicted_unless_pinned(
    make_harness: Any, origin: Origin, datacache_settings: DatacacheSettings
) -> None:
    settings = datacache_settings.model_copy(update={"object_ttl_s": 3600})
    harness: Harness = await make_harness(settings)
    for name in ("old", "pinned"):
        origin.files[name] = os.urandom(1000)
        await _staged_ok(harness, f"job-{name}", f"{origin.url}/{name}")
    await harness.release("job-old")
    long_ago = utcnow() - timedelta(hours=2)
    await harness.client.app[STORE].objects.update_many({}, {"$set": {"last_access": long_ago}})
    evicted = await harness.client.app[EVICTOR].evict_once()
    assert evicted == [_sha(origin.files["old"])]
    # Gone from the cache: the next job on that source fetches it again.
    await _staged_ok(harness, "job-again", f"{origin.url}/old")
    assert origin.requests["GET"] == 3


async def test_a_range_past_any_size_is_416_and_roles_reach_only_their_routes(
    harness: Harness, origin: Origin
) -> None:
    """F8 and F12 of the HTTP fuzzing: a 5,000-digit range; a user on a node's route and
    a node on a tenant's."""
    data = os.urandom(1000)
    origin.files["r.bin"] = data
    await _staged_ok(harness, "job-r", f"{origin.url}/r.bin")
    await harness.grant("job-r")
    huge = await harness.read("job-r", _sha(data), Range="bytes=0-" + "9" * 5000)
    assert huge.status == 416
    assert "Range" in (await huge.json())["error"]["detail"]

    as_user = await harness.read("job-r", _sha(data), auth=harness.user_auth)
    assert as_user.status == 403
    as_node = await harness.client.get("/v1/jobs/job-r/outputs", headers=harness.node_auth)
    assert as_node.status == 403
    assert (await as_node.json())["error"]["detail"] == "this needs the user or operator role"
