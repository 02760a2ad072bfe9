"""`GET /v1/events/stream`: live records over SSE, resumable without gap or duplicate."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from services.audit import api as audit_api
from services.audit import recorder
from services.audit.app import create_app
from services.audit.settings import AuditSettings
from services.audit.store import AuditStore
from shared.auth import Role
from shared.bus import Bus
from shared.messages.jobs import JobEvent, JobState
from shared.server import listen
from tests.conftest import free_port
from tests.helpers import eventually
from tests.integration.audit.conftest import StartApp
from tests.integration.audit.support import auth, next_event


async def _emit(bus: Bus, numbers: range, tenant: str = "t1") -> None:
    for n in numbers:
        event = JobEvent(job_id=f"j{n}", state=JobState.queued)
        await bus.emit("job.queued", event, correlation_id=f"j{n}", tenant=tenant)


async def test_stream_is_live_and_resumes_after_a_disconnect_without_gap_or_duplicate(
    start_app: StartApp, bus: Bus, token: Any
) -> None:
    client = await start_app()
    headers = auth(await token("ops", Role.operator))
    seen: list[int] = []

    stream = await client.get("/v1/events/stream", headers=headers)
    assert stream.status == 200
    assert stream.content_type == "text/event-stream"
    await _emit(bus, range(0, 5))
    for _ in range(5):
        event = await next_event(stream)
        assert event["event"] == "job.queued"
        assert event["data"]["seq"] == int(event["id"])
        seen.append(int(event["id"]))
    stream.close()  # the client drops the connection

    await _emit(bus, range(5, 10))  # published while nobody listens
    resumed = await client.get(
        "/v1/events/stream", headers={**headers, "Last-Event-ID": str(seen[-1])}
    )
    await _emit(bus, range(10, 13))  # and live again after the reconnect
    for _ in range(8):
        seen.append(int((await next_event(resumed))["id"]))
    resumed.close()
    assert seen == list(range(1, 14))


async def test_live_records_come_from_memory_and_an_old_cursor_from_the_store(
    start_app: StartApp, bus: Bus, token: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newest records reach a live stream without a query; a stream resumed from
    further back than memory holds reads the store, then goes on from memory."""
    pages: list[tuple[int, int | None]] = []
    page = AuditStore.page

    async def counted(self: AuditStore, query: Any, *, after: int, limit: int, upto: Any) -> Any:
        pages.append((after, upto))
        return await page(self, query, after=after, limit=limit, upto=upto)

    monkeypatch.setattr(AuditStore, "page", counted)
    monkeypatch.setattr(recorder, "RECENT_RECORDS", 4)
    client = await start_app()
    headers = auth(await token("ops", Role.operator))
    live = await client.get("/v1/events/stream", headers=headers)
    for start in (0, 3):  # read as they come: memory holds the four newest
        await _emit(bus, range(start, start + 3))
        assert [int((await next_event(live))["id"]) for _ in range(3)] == [
            start + 1, start + 2, start + 3
        ]  # fmt: skip
    assert pages == []
    live.close()

    resumed = await client.get("/v1/events/stream", headers={**headers, "Last-Event-ID": "1"})
    assert [int((await next_event(resumed))["id"]) for _ in range(5)] == [2, 3, 4, 5, 6]
    await _emit(bus, range(6, 8))
    assert [int((await next_event(resumed))["id"]) for _ in range(2)] == [7, 8]
    resumed.close()
    assert pages == [(1, 6)]


async def test_a_users_stream_carries_only_its_tenant(
    start_app: StartApp, bus: Bus, token: Any
) -> None:
    client = await start_app()
    stream = await client.get("/v1/events/stream", headers=auth(await token("t2")))
    await _emit(bus, range(0, 3), tenant="t1")
    await _emit(bus, range(3, 5), tenant="t2")
    jobs = [(await next_event(stream))["data"]["job_id"] for _ in range(2)]
    assert jobs == ["j3", "j4"]
    stream.close()


async def test_an_open_stream_ends_cleanly_when_the_app_shuts_down(
    start_app: StartApp, bus: Bus, token: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start_app()
    stream = await client.get(
        "/v1/events/stream", params={"after": 1}, headers=auth(await token("ops", Role.operator))
    )
    await _emit(bus, range(0, 2))
    assert (await next_event(stream))["id"] == "2"
    with capture_logs() as logs:
        async with asyncio.timeout(5):  # not the 60 s aiohttp waits for open requests
            await client.server.close()  # graceful shutdown, the client still reading
        with pytest.raises(EOFError):
            await next_event(stream, within_s=5)
    stream.close()
    assert [log for log in logs if log["log_level"] in ("error", "critical")] == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_live_streams_are_bounded_per_token_and_in_all(
    audit_settings: AuditSettings, aiohttp_client: Any, token: Any
) -> None:
    """F10: past the bound a new stream is 429, and one that ends gives its place back."""
    settings = audit_settings.model_copy(update={"streams_per_token": 2, "streams_total": 3})
    client = await aiohttp_client(create_app(settings))
    first, second = auth(await token("t1")), auth(await token("t2"))
    held = [await client.get("/v1/events/stream", headers=first) for _ in range(2)]
    assert [r.status for r in held] == [200, 200]
    refused = await client.get("/v1/events/stream", headers=first)
    assert refused.status == 429
    assert "this token has 2 live streams" in (await refused.json())["error"]["detail"]
    third = await client.get("/v1/events/stream", headers=second)
    assert third.status == 200
    refused = await client.get("/v1/events/stream", headers=second)
    assert refused.status == 429 and "3 live streams" in (await refused.json())["error"]["detail"]
    # Queries go on while the streams are open.
    assert (await client.get("/v1/events", headers=first)).status == 200

    held[0].close()

    async def freed() -> bool:
        response = await client.get("/v1/events/stream", headers=first)
        response.close()
        return response.status == 200

    await eventually(freed)


async def test_two_hundred_streams_at_once_leave_the_api_answering(
    start_app: StartApp, token: Any
) -> None:
    """F10: 200 streams asked for at once from 50 token holders: the bound lets 64 run
    and refuses the rest with 429, and queries and health checks go on answering."""
    client = await start_app()
    holders = [auth(await token(f"t{n}")) for n in range(50)]
    opened = await asyncio.gather(
        *(client.get("/v1/events/stream", headers=h) for h in holders for _ in range(4))
    )
    statuses = sorted(r.status for r in opened)
    assert statuses.count(200) == 64 and statuses.count(429) == 136
    slow = 0
    async with asyncio.timeout(30):  # answered at all, while the streams are held open
        for n in range(20):
            started = asyncio.get_running_loop().time()
            assert (await client.get("/v1/events", headers=holders[n])).status == 200
            assert (await client.get("/healthz")).status == 200
            slow += asyncio.get_running_loop().time() - started > 1.0
    logging.getLogger(__name__).info("requests over 1 s with 64 streams open: %d", slow)
    for response in opened:
        response.close()


async def test_a_stream_whose_client_leaves_gives_its_slot_back_at_once(
    audit_settings: AuditSettings, token: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user who follows a few jobs one after another (`medhive submit --follow`, each
    a stream closed at its end) is never refused: the server as services run it
    (`shared.server.listen`) ends a waiting stream when its client leaves, not at its
    next keep-alive, which is made never to come here."""
    monkeypatch.setattr(audit_api, "KEEPALIVE_S", 3600.0)
    settings = audit_settings.model_copy(update={"streams_per_token": 2})
    port = free_port()
    listener = await listen(create_app(settings), "127.0.0.1", port)
    url = f"http://127.0.0.1:{port}/v1/events/stream"
    headers = auth(await token("t1"))
    try:
        for _ in range(3):  # more streams in turn than the token may hold at once
            async with aiohttp.ClientSession() as session:
                held = [await session.get(url, headers=headers) for _ in range(2)]
                assert [r.status for r in held] == [200, 200]
                for response in held:
                    response.close()  # the client leaves: its connection is closed

            async def freed() -> bool:
                async with aiohttp.ClientSession() as session:
                    response = await session.get(url, headers=headers)
                    response.close()
                    return response.status == 200

            await eventually(freed, within=10)
    finally:
        await listener.close()
