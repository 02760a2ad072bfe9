"""Sends webhook deliveries: signs them, POSTs them, and records each outcome.

The sender claims due deliveries (deliveries.py says how claims work) and sends up to
`MAX_IN_FLIGHT` at once. Each try is signed as the Standard Webhooks specification
says (`webhook-id`, `webhook-timestamp`, `webhook-signature` over id, timestamp and
body with the webhook's secret, by the `standardwebhooks` library), POSTed with a short
timeout and no redirects followed, to an address the SSRF guard permits (egress.py).
A 2xx answer delivers it; anything else is a failed try, tried again after a doubling
wait (`webhook_first_retry_s`, doubling to `webhook_max_retry_s`) until the next try
would come later than `webhook_max_age_s` after it was queued: then it is given up.

Every outcome is published as an event with the tenant set (`webhook.delivered`,
`webhook.failed`, `webhook.given_up`), which the audit records; each event's id is
derived from the delivery (and the try), so one published twice is recorded once.

One module because the sweep finishes what the sender starts: it publishes the outcome
events that `DeliveryWorker._try` stored in a delivery's `announce` but could not
publish, and it leaves alone those younger than twice `PUBLISH_DEADLINE_S`, which the
sender may be publishing right then.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
import structlog
from pymongo.errors import PyMongoError
from standardwebhooks import Webhook
from yarl import URL

from services.scheduler.deliveries import DELIVERED, GIVEN_UP, DeliveryStore
from services.scheduler.egress import Guard, TargetRefused
from services.scheduler.webhooks import Webhooks
from shared.backoff import Backoff
from shared.bus import Bus
from shared.envelope import Envelope, derived_id, utcnow
from shared.messages.webhooks import (
    WebhookAttempt,
    WebhookDelivered,
    WebhookFailed,
    WebhookGivenUp,
)
from shared.mongo import Document
from shared.tasks import BackgroundLoop, PeriodicLoop

log = structlog.get_logger("medhive.scheduler.webhooks")

#: Deliveries sent at once.
MAX_IN_FLIGHT = 16
#: The longest the sender sleeps without looking for due deliveries (another scheduler
#: may have queued some; the wake-up only comes from this one).
POLL_S = 5.0
#: How much longer than a try's timeout a claim lasts: then another sender may take it.
LEASE_MARGIN_S = 30.0
#: How long publishing an outcome may take before the sweep is left to do it.
PUBLISH_DEADLINE_S = 10.0
#: How long ended deliveries are kept (a repeated event within it adds none again).
KEEP_ENDED_S = 7 * 86400.0
#: How long stopping waits for the database beyond what a try may take.
STOP_GRACE_S = 5.0
USER_AGENT = "medhive-webhooks/1"


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed delivery is tried again, and when it is given up."""

    first_s: float
    most_s: float
    max_age_s: float
    timeout_s: float

    @property
    def lease_s(self) -> float:
        return self.timeout_s + LEASE_MARGIN_S

    def next_try(self, tries: int, queued_at: datetime, now: datetime) -> datetime | None:
        """When to try again after `tries` failed tries; None: give up."""
        wait = Backoff(self.first_s, self.most_s).after(tries - 1)
        at = now + timedelta(seconds=wait)
        return at if at <= queued_at + timedelta(seconds=self.max_age_s) else None


@dataclass(frozen=True)
class Answer:
    """What one try got: the receiver's status, or why there was none."""

    status: int | None
    error: str | None
    duration_ms: float

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class DeliveryWorker(BackgroundLoop):
    """Claims due deliveries and sends them; `wake()` when some were queued."""

    task_name = "webhook-sender"

    def __init__(
        self,
        store: DeliveryStore,
        webhooks: Webhooks,
        guard: Guard,
        bus: Bus,
        session: aiohttp.ClientSession,
        policy: RetryPolicy,
    ) -> None:
        super().__init__()
        self.store = store
        self.webhooks = webhooks
        self.guard = guard
        self.bus = bus
        self.session = session
        self.policy = policy
        self._wanted = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stopping = False

    def wake(self) -> None:
        self._wanted.set()

    async def run(self) -> None:
        while not self._stopping:
            self._wanted.clear()
            try:
                while len(self._in_flight) < MAX_IN_FLIGHT and not self._stopping:
                    claimed = await self.store.claim(utcnow(), self.policy.lease_s)
                    if claimed is None:
                        break
                    self._send_soon(claimed)
                wait = await self._until_due()
            except PyMongoError as exc:
                log.warning("webhook_claim_failed", error=repr(exc)[:300], retry_in_s=1)
                wait = 1.0  # the database is away: look again shortly
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wanted.wait()

    async def _until_due(self) -> float:
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            return POLL_S  # a finished send wakes the loop
        due = await self.store.next_due()
        if due is None:
            return POLL_S
        return min(max((due - utcnow()).total_seconds(), 0.01), POLL_S)

    def _send_soon(self, claimed: Document) -> None:
        task = asyncio.create_task(self._deliver(claimed), name=f"webhook-{claimed['_id']}")
        self._in_flight.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._in_flight.discard(task)
            self.wake()

        task.add_done_callback(done)

    async def stop(self) -> None:
        """Stop claiming, between two claims (one cancelled under way could be stored
        and never sent: it would wait for its lease); let the tries under way finish
        (each is bounded by its timeout); what is cut off is due again after its lease."""
        self._stopping = True
        self.wake()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=STOP_GRACE_S)
        await super().stop()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=self.policy.timeout_s + STOP_GRACE_S)
        left = set(self._in_flight)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)

    async def _deliver(self, claimed: Document) -> None:
        with structlog.contextvars.bound_contextvars(
            delivery_id=claimed["_id"], tenant=claimed["tenant"], job_id=claimed["job_id"]
        ):
            try:
                await self._try(claimed)
            except Exception:  # one delivery's trouble ends neither the sender nor others
                log.exception("webhook_delivery_failed")

    async def _try(self, claimed: Document) -> None:
        webhook = await self.webhooks.get(claimed["webhook_id"])
        if webhook is None:  # removed since it was queued
            await self.store.drop(claimed)
            return
        answer = await self._post(webhook, claimed)
        fields, envelope = self._outcome(claimed, webhook, answer, utcnow())
        log.info(
            envelope.type.replace(".", "_"),
            attempt=fields["attempts"],
            status=answer.status,
            error=answer.error,
            next_try_at=fields.get("due_at"),
        )
        body = envelope.model_dump_json().encode()
        announce = {"id": str(envelope.id), "body": body, "at": utcnow()}
        if not await self.store.settle(claimed, fields, announce):
            log.warning("webhook_claim_lost")  # its lease ran out: another sender has it
            return
        await self.bus.publish(envelope, body=body, deadline_s=PUBLISH_DEADLINE_S)
        await self.store.announced(claimed["_id"], str(envelope.id))

    def _outcome(
        self, claimed: Document, webhook: Document, answer: Answer, now: datetime
    ) -> tuple[Document, Envelope]:
        """What a try makes of the delivery (fields to store) and the event saying so."""
        tries = claimed["attempts"] + 1
        fields: Document = {"attempts": tries, "last_status": answer.status,
                            "last_error": answer.error}  # fmt: skip
        said = WebhookAttempt(
            delivery_id=claimed["_id"],
            webhook_id=claimed["webhook_id"],
            event_type=claimed["event_type"],
            event_id=claimed["event_id"],
            job_id=claimed["job_id"],
            target=str(URL(webhook["url"]).origin()),
            attempt=tries,
            status_code=answer.status,
            error=answer.error,
            duration_ms=answer.duration_ms,
        ).model_dump()
        if answer.accepted:
            fields |= {"state": DELIVERED, "finished_at": now}
            return fields, self._event(claimed, "webhook.delivered", WebhookDelivered(**said))
        next_try = self.policy.next_try(tries, claimed["created_at"], now)
        if next_try is not None:
            fields["due_at"] = next_try
            failed = WebhookFailed(**said, next_try_at=next_try)
            return fields, self._event(claimed, "webhook.failed", failed, tries)
        fields |= {"state": GIVEN_UP, "finished_at": now}
        reason = f"not accepted within {self.policy.max_age_s:g} s of being queued"
        given_up = WebhookGivenUp(**said, queued_at=claimed["created_at"], reason=reason)
        return fields, self._event(claimed, "webhook.given_up", given_up)

    async def _post(self, webhook: Document, claimed: Document) -> Answer:
        started = time.perf_counter()

        def answer(status: int | None, error: str | None = None) -> Answer:
            return Answer(status, error, round((time.perf_counter() - started) * 1000, 2))

        try:
            url = self.guard.check_url(webhook["url"])  # the rules may have changed since
            secret = self.webhooks.secret(webhook)
        except (TargetRefused, ValueError) as exc:
            return answer(None, f"refused: {exc.reason if isinstance(exc, TargetRefused) else exc}")
        sent_at = datetime.fromtimestamp(int(time.time()), UTC)
        headers = {
            "webhook-id": claimed["_id"],
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": Webhook(secret).sign(claimed["_id"], sent_at, claimed["body"]),
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        try:
            async with self.session.post(
                url, data=claimed["body"].encode(), headers=headers, allow_redirects=False
            ) as response:
                return answer(response.status)
        except TimeoutError:
            return answer(None, f"no answer within {self.policy.timeout_s:g} s")
        except aiohttp.ClientError as exc:
            return answer(None, _connection_error(exc))

    def _event(
        self, claimed: Document, type_: str, payload: WebhookAttempt, *tries: int
    ) -> Envelope:
        """An outcome event, its id derived from the delivery (and the try)."""
        return self.bus.envelope(
            type_,
            payload,
            id=derived_id(type_, claimed["_id"], *tries),
            correlation_id=claimed["job_id"],
            causation_id=claimed["event_id"],
            tenant=claimed["tenant"],
        )


def _connection_error(exc: aiohttp.ClientError) -> str:
    """Why a try got no answer, in a line (a refused address says the rule's reason)."""
    cause = exc.__cause__ if isinstance(exc.__cause__, TargetRefused) else None
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, TargetRefused):
        cause = exc.os_error
    if cause is not None:
        return f"refused: {cause.reason}"
    return f"{type(exc).__name__}: {exc}"[:300]


class OutcomeSweep(PeriodicLoop):
    """Publishes outcome events a crash left unpublished, and drops old ended
    deliveries; at start, then every `period_s`."""

    task_name = "webhook-sweep"
    first_at_once = True

    def __init__(self, store: DeliveryStore, bus: Bus, period_s: float = 30.0) -> None:
        super().__init__(period_s)
        self.store = store
        self.bus = bus

    async def tick(self) -> None:
        now = utcnow()
        # Older than a publish may take: what is younger may be under way right now.
        settled = now - timedelta(seconds=PUBLISH_DEADLINE_S * 2)
        for delivery in await self.store.unannounced(settled):
            for announcement in delivery["announce"]:
                body = bytes(announcement["body"])
                await self.bus.publish(Envelope.model_validate_json(body), body=body)
                await self.store.announced(delivery["_id"], announcement["id"])
        await self.store.purge(now - timedelta(seconds=KEEP_ENDED_S))
