"""What the webhook tests share: a receiver as a tenant would write one, on a loopback
address (it verifies each delivery with the `standardwebhooks` library, and can fail
or be down on purpose), settings with quick retries, and jobs that make events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from standardwebhooks import Webhook, WebhookVerificationError

from services.scheduler.settings import SchedulerSettings
from tests.conftest import free_port
from tests.helpers import EventTap

JOB = {"name": "hooked", "image": "medhive/busybox:1", "command": ["true"]}
#: The events of a job submitted and cancelled before any node took it.
JOB_LIFE = ("job.submitted", "job.queued", "job.cancelled")


def quick(settings: SchedulerSettings, **changes: Any) -> SchedulerSettings:
    """The test's scheduler settings with webhooks retried within a second."""
    quick_retries = {
        "webhook_first_retry_s": 0.1,
        "webhook_max_retry_s": 0.4,
        "webhook_timeout_s": 2.0,
        "webhook_allowed_hosts": ["127.0.0.1"],
    }
    return settings.model_copy(update={**quick_retries, **changes})


async def register(
    client: TestClient, headers: dict[str, str], url: str, events: list[str] | None = None
) -> dict[str, Any]:
    """Register a webhook (201 expected); returns the answer, secret included."""
    response = await client.post(
        "/v1/webhooks", json={"url": url, "events": events or ["job.*"]}, headers=headers
    )
    assert response.status == 201, await response.text()
    created: dict[str, Any] = await response.json()
    return created


async def job_life(client: TestClient, headers: dict[str, str], tap: EventTap) -> list[str]:
    """Submit a job and cancel it (no node runs it); returns the ids of its events."""
    job = await (await client.post("/v1/jobs", json=JOB, headers=headers)).json()
    assert (await client.delete(f"/v1/jobs/{job['id']}", headers=headers)).status == 202
    await tap.wait_for(lambda m: m["type"] == "job.cancelled" and m["correlation_id"] == job["id"])
    events = tap.of_job(job["id"])
    assert sorted(m["type"] for m in events) == sorted(JOB_LIFE)
    return [m["id"] for m in events]


@dataclass(frozen=True)
class Seen:
    """One request the receiver got, and what it answered."""

    delivery_id: str | None
    body: dict[str, Any] | None
    status: int


class Receiver:
    """Answers 500 to the first `fail_first` deliveries, then `status`; a delivery whose
    signature does not verify gets 400 and is kept in `unverified`. `stop()` closes the
    port (nothing listens), `start()` opens the same one again."""

    def __init__(self, host: str = "127.0.0.1", fail_first: int = 0, status: int = 200) -> None:
        self.host = host
        self.port = free_port()
        self.fail_first = fail_first
        self.status = status
        self.secret: str | None = None
        self.seen: list[Seen] = []
        self.unverified: list[str] = []
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hooks/medhive"

    @property
    def accepted(self) -> dict[str, dict[str, Any]]:
        """Body of each delivery answered 2xx, by its `webhook-id` (repeats fold)."""
        return {
            seen.delivery_id: seen.body
            for seen in self.seen
            if 200 <= seen.status < 300 and seen.delivery_id and seen.body is not None
        }

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/medhive", self._receive)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _receive(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body: dict[str, Any] | None = None
        try:
            assert self.secret is not None, "a delivery before the webhook was registered"
            body = Webhook(self.secret).verify(raw, dict(request.headers))
        except (WebhookVerificationError, AssertionError) as exc:
            self.unverified.append(f"{exc}: {raw[:200]!r}")
            status = 400
        else:
            status = 500 if len(self.seen) < self.fail_first else self.status
        async with self._changed:
            self.seen.append(Seen(request.headers.get("webhook-id"), body, status))
            self._changed.notify_all()
        return web.Response(status=status)

    async def wait_for(self, done: Callable[[Receiver], bool], within: float = 30.0) -> None:
        """Until `done(self)` holds, as deliveries arrive."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: done(self))

    def event_ids(self) -> list[str]:
        """The `event_id` of every accepted delivery (one per `webhook-id`)."""
        return [body["data"]["event_id"] for body in self.accepted.values()]
