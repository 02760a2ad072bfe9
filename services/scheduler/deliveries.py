"""Webhook deliveries: one document per message and webhook, from queued to its end.

A job event from the bus becomes a delivery for each webhook of its tenant that asked
for its type, stored before the event is acknowledged (a restart loses none). Its id,
`msg_` and a uuid derived from the webhook and the event, is the `webhook-id` header
of every try: a redelivered event adds no second delivery (the insert is an upsert on
that id), and a receiver that saw a message already drops it by that header.

A delivery is `pending` until it ends `delivered` or `given_up`; `due_at` is when its
next try may start. A sender claims a due one by moving `due_at` past a lease and
writing its own `lease` token in the same update, so no two senders try one at once,
and a claim whose sender died becomes due again when the lease runs out. What the
sender learnt is stored only under its token, together with the outcome event it then
publishes (`announce`, this delivery's outbox): a crash between the two loses no
audit record, it is published by the next sweep (delivery_worker.py).
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog
from aiohttp import web
from pymongo import ASCENDING, ReturnDocument, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from services.scheduler.webhooks import TEST_EVENT, Webhooks
from shared.consume import Incoming
from shared.envelope import derived_id, utcnow
from shared.messages.base import Payload
from shared.mongo import DUPLICATE_KEY, Document

log = structlog.get_logger("medhive.scheduler.deliveries")

PENDING, DELIVERED, GIVEN_UP = "pending", "delivered", "given_up"


def delivery_id(webhook_id: str, event_id: str) -> str:
    """The one id of the message announcing `event_id` to `webhook_id`."""
    return f"msg_{derived_id('webhook', webhook_id, event_id).hex}"


def message_body(event_type: str, timestamp: datetime, data: Document) -> str:
    """What a receiver gets: the Standard Webhooks body (`type`, `timestamp`, `data`)."""
    body = {"type": event_type, "timestamp": timestamp.isoformat(), "data": data}
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


class DeliveryStore:
    """The `webhook_deliveries` collection."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.collection = db["webhook_deliveries"]

    async def create_indexes(self) -> None:
        await self.collection.create_index([("state", ASCENDING), ("due_at", ASCENDING)])
        await self.collection.create_index([("webhook_id", ASCENDING)])
        await self.collection.create_index([("announce.at", ASCENDING)], sparse=True)
        await self.collection.create_index([("finished_at", ASCENDING)], sparse=True)

    async def add(self, deliveries: list[Document]) -> None:
        """Queue deliveries; one whose id is stored already stays as it is."""
        if not deliveries:
            return
        writes = [
            UpdateOne({"_id": d["_id"]}, {"$setOnInsert": d}, upsert=True) for d in deliveries
        ]
        try:
            await self.collection.bulk_write(writes, ordered=False)
        except BulkWriteError as exc:  # two upserts of one id raced: one of them stored it
            if any(e.get("code") != DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
                raise

    async def claim(self, now: datetime, lease_s: float) -> Document | None:
        """The most overdue pending delivery, now this caller's for `lease_s`."""
        return await self.collection.find_one_and_update(
            {"state": PENDING, "due_at": {"$lte": now}},
            {"$set": {"due_at": now + timedelta(seconds=lease_s), "lease": secrets.token_hex(8)}},
            sort=[("due_at", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )

    async def next_due(self) -> datetime | None:
        """When the next pending delivery is due, if there is one."""
        doc = await self.collection.find_one(
            {"state": PENDING}, {"due_at": 1}, sort=[("due_at", ASCENDING)]
        )
        return doc["due_at"] if doc else None

    async def settle(self, claimed: Document, fields: Document, announce: Document) -> bool:
        """Store a try's outcome and the event announcing it, if the claim is still the
        caller's (False: its lease ran out and another sender took it)."""
        result = await self.collection.update_one(
            {"_id": claimed["_id"], "lease": claimed["lease"]},
            {"$set": {**fields, "lease": None}, "$push": {"announce": announce}},
        )
        return result.matched_count == 1

    async def drop(self, claimed: Document) -> None:
        """Forget a claimed delivery (its webhook is gone)."""
        await self.collection.delete_one({"_id": claimed["_id"], "lease": claimed["lease"]})

    async def announced(self, delivery: str, announcement: str) -> None:
        await self.collection.update_one(
            {"_id": delivery}, {"$pull": {"announce": {"id": announcement}}}
        )

    async def unannounced(self, before: datetime) -> list[Document]:
        """Deliveries with an outcome event stored before `before` and not published."""
        return await self.collection.find({"announce.at": {"$lt": before}}).to_list()

    async def forget_webhook(self, webhook_id: str) -> int:
        """Drop what is still to be sent to a webhook that was removed."""
        result = await self.collection.delete_many({"webhook_id": webhook_id, "state": PENDING})
        return result.deleted_count

    async def purge(self, before: datetime) -> int:
        """Drop deliveries that ended before `before` and have nothing to announce."""
        result = await self.collection.delete_many(
            {"finished_at": {"$lt": before}, "announce.0": {"$exists": False}}
        )
        return result.deleted_count


class Deliveries:
    """What is to be delivered: job events from the bus, and test messages."""

    def __init__(self, store: DeliveryStore, webhooks: Webhooks) -> None:
        self.store = store
        self.webhooks = webhooks
        #: Called when deliveries were queued (the sender's wake-up).
        self.queued: Callable[[], None] = lambda: None

    async def job_event(self, msg: Incoming[Payload]) -> None:
        """Handler of the job events: a delivery for each webhook that wants it."""
        envelope = msg.envelope
        if envelope.tenant is None:  # a job event always names its tenant
            return
        wanting = await self.webhooks.wanting(envelope.tenant, envelope.type)
        if not wanting:
            return
        event_id, now = str(envelope.id), utcnow()
        data = {**envelope.payload, "tenant": envelope.tenant, "event_id": event_id}
        body = message_body(envelope.type, envelope.occurred_at, data)
        deliveries = [
            _delivery(delivery_id(webhook["_id"], event_id), webhook, envelope.type, body, now,
                      event_id=event_id, job_id=envelope.correlation_id)
            for webhook in wanting
        ]  # fmt: skip
        await self.store.add(deliveries)
        log.debug("webhooks_queued", event_type=envelope.type, webhooks=len(wanting))
        self.queued()

    async def test(self, webhook: Document) -> str:
        """Queue a test message to a webhook; returns its delivery id."""
        now = utcnow()
        data = {
            "webhook_id": webhook["_id"],
            "tenant": webhook["tenant"],
            "message": "A test delivery from medhive: the webhook is reached and signed.",
        }
        delivery = _delivery(
            f"msg_{uuid.uuid4().hex}", webhook, TEST_EVENT, message_body(TEST_EVENT, now, data), now
        )
        await self.store.add([delivery])
        self.queued()
        return str(delivery["_id"])


def _delivery(
    id_: str,
    webhook: Document,
    event_type: str,
    body: str,
    now: datetime,
    event_id: str | None = None,
    job_id: str | None = None,
) -> Document:
    return {
        "_id": id_,
        "webhook_id": webhook["_id"],
        "tenant": webhook["tenant"],
        "event_type": event_type,
        "event_id": event_id,
        "job_id": job_id,
        "body": body,
        "state": PENDING,
        "attempts": 0,
        "created_at": now,
        "due_at": now,
        "lease": None,
        "announce": [],
    }


DELIVERIES = web.AppKey("deliveries", Deliveries)
