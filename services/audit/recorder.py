"""The recorder: consumes every command and event and appends each to the chain once.

It consumes raw with aio-pika rather than through `Bus.consume`, because here a body
that fails to decode is recorded too, not dead-lettered (the services' own consumers
announce those with `message.rejected`). Deliveries arrive as concurrent tasks; they
only go into an inbox, and one writer task drains it in batches, so that `seq` and
the hash chain are assigned strictly one record after the other.

Crash safety: a batch is stored before any of it is acknowledged. A crash in between
makes the broker redeliver it, and records are keyed by message id, so the redelivery
is recognised and only acknowledged. One recorder writes at a time; if a second one
ever does, the unique `seq` index refuses one of them, which reloads and goes on.

One module because consuming, batching, storing and acknowledging all turn on the one
chain head and the one channel of `Recorder`: a batch is acked only after `_append` has
moved `_head` past it, and acking it with one `multiple` frame is right only because the
same writer task takes and settles the batches in delivery order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aiohttp import web
from prometheus_client import Counter, Histogram
from pymongo.errors import BulkWriteError, PyMongoError

from services.audit.chain import Head, link
from services.audit.records import Received, receive
from services.audit.store import AuditStore
from shared.backoff import Backoff
from shared.bus import Bus
from shared.envelope import utcnow
from shared.identity import AmqpUsers, Sender
from shared.messages.catalog import COMMANDS, EVENTS, TENANTS
from shared.metrics import with_series
from shared.mongo import DUPLICATE_KEY
from shared.topology import AUDIT_ALL, declare_exchanges, declare_queue

log = structlog.get_logger("medhive.audit")

#: Everything on every exchange: the recorder takes no handler table, it keeps all.
BINDINGS = [(COMMANDS, "#"), (EVENTS, "#"), (TENANTS, "#")]
_AMQP_ERRORS = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError)


#: The recorder stores every message, valid or not, so no message is poison for it:
#: the only redeliveries are after a crash or a database outage, and each of those
#: counts towards the limit. A high limit keeps such a message in the audit trail.
AUDIT_DELIVERY_LIMIT = 1000


#: Newest stored records kept in memory for the live streams (about 1 KiB each).
RECENT_RECORDS = 4096


class Notifier:
    """The highest stored `seq`, a wake-up for the live streams waiting past it, and the
    newest records themselves.

    A live stream reads what was just stored from here rather than from the store: with
    operators tailing the audit, each stream cost the database a query for every batch
    the recorder stored. The records kept are exactly those stored (the same fields,
    times already cut to the millisecond as the database keeps them), and only a run
    with no gap: a stream whose cursor is older reads the store.
    """

    def __init__(self, recent: int | None = None) -> None:
        self.head = 0
        self.closed = False
        self._changed = asyncio.Event()
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent or RECENT_RECORDS)

    def advance(self, seq: int, records: Sequence[dict[str, Any]] = ()) -> None:
        """`records` (in `seq` order, ending at `seq`) are stored."""
        if not records or (self._recent and self._recent[-1]["seq"] != records[0]["seq"] - 1):
            self._recent.clear()  # a gap (records stored by a failed try): start again
        self._recent.extend(records)
        self.head = seq
        self._changed.set()
        self._changed = asyncio.Event()

    def recent(self, after: int, upto: int) -> list[dict[str, Any]] | None:
        """The stored records with `after < seq <= upto`, from memory; None when memory
        does not hold all of them."""
        if after >= upto:
            return []
        if not self._recent or self._recent[0]["seq"] > after + 1:
            return None
        start = after + 1 - self._recent[0]["seq"]
        return list(itertools.islice(self._recent, start, start + upto - after))

    def close(self) -> None:
        """The service is stopping: every waiting stream should end."""
        self.closed = True
        self._changed.set()

    async def wait_past(self, seq: int, wait_s: float) -> bool:
        """Wait until a record after `seq` is stored or the service closes; False on timeout."""
        if self.head > seq or self.closed:
            return True
        try:
            await asyncio.wait_for(self._changed.wait(), wait_s)
        except TimeoutError:
            return False
        return True


NOTIFIER = web.AppKey("audit_notifier", Notifier)


class Recorder:
    """Consumes `audit.all` and writes batches of records, each message once."""

    def __init__(
        self,
        bus: Bus,
        store: AuditStore,
        notifier: Notifier,
        senders: AmqpUsers,
        *,
        batch_size: int,
        batch_wait_s: float,
    ) -> None:
        self.bus = bus
        self.store = store
        self.notifier = notifier
        self.senders = senders
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self._inbox: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._head = Head()
        self._stopping = False
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._writer: asyncio.Task[None] | None = None
        # Added to the app's /metrics by the app (services/audit/metrics.py).
        self.stored = with_series(
            Counter(
                "medhive_audit_records_stored",
                "Records appended to the audit chain, by whether the message was valid "
                "(a redelivery of a stored message is recognised and not stored again).",
                ["valid"],
                registry=None,
            ),
            "true",
            "false",
        )
        self.ingest_lag = Histogram(
            "medhive_audit_ingest_lag_seconds",
            "From the time a message gives for itself to its record being stored.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=None,
        )

    def backlog(self) -> int:
        """Deliveries received and not yet taken into a batch."""
        return self._inbox.qsize()

    async def start(self) -> None:
        """Continue the chain from the last stored record, then start consuming."""
        self._head = await self._load_head()
        self.notifier.advance(self._head.seq)
        self._channel = await self.bus.connection.channel()
        # Room for a full batch to gather while the previous one is being written.
        await self._channel.set_qos(prefetch_count=2 * self.batch_size)
        exchanges = await declare_exchanges(self._channel)
        self._queue = await declare_queue(
            self._channel, AUDIT_ALL, BINDINGS, exchanges, AUDIT_DELIVERY_LIMIT
        )
        self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")
        self._tag = await self._queue.consume(self._on_message)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop consuming, store what was delivered (bounded by `grace_s`), close.

        Deliveries still unacknowledged go back to the queue with the channel and come
        again to the next start, where those already stored are recognised.
        """
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(*_AMQP_ERRORS):  # the connection may be gone already
                await self._queue.cancel(self._tag)
        self._inbox.put_nowait(None)
        if self._writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), grace_s)
            except TimeoutError:
                log.warning("audit_writer_stop_timeout", pending=self._inbox.qsize())
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
        if self._channel is not None:
            with contextlib.suppress(*_AMQP_ERRORS):
                await self._channel.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._inbox.put_nowait(message)

    async def _write_loop(self) -> None:
        while batch := await self._next_batch():
            started = time.perf_counter()
            try:
                redelivered = any(message.redelivered for message in batch)
                stored = await self._store(await self._received(batch), redelivered)
            except Exception:
                # A bug, not an outage (those are retried in _store): hand the batch back
                # so that the delivery limit dead-letters a message that fails every time.
                log.exception("audit_batch_failed", size=len(batch))
                await self._settle(batch, ack=False)
                continue
            await self._settle(batch, ack=True)
            log.debug(
                "audit_batch_stored",
                received=len(batch),
                stored=stored,
                head=self._head.seq,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )

    async def _next_batch(self) -> list[AbstractIncomingMessage]:
        """The next deliveries: waits for one, then up to `batch_wait_s` for more.

        Empty once `stop` has been asked for and everything before it was taken.
        """
        if self._stopping:
            return []
        first = await self._inbox.get()
        if first is None:
            return []
        batch = [first]
        deadline = asyncio.get_running_loop().time() + self.batch_wait_s
        while len(batch) < self.batch_size:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await self._inbox.get()
            except TimeoutError:
                break
            if message is None:
                self._stopping = True
                break
            batch.append(message)
        return batch

    async def _received(self, batch: list[AbstractIncomingMessage]) -> list[Received]:
        """The batch decoded, each delivery with the sender RabbitMQ vouches for."""
        senders: dict[str | None, Sender] = {}
        backoff = Backoff(0.1, 5.0)
        for user in {message.user_id for message in batch}:
            while True:
                try:
                    senders[user] = await self.senders.sender(user)
                    break
                except PyMongoError as exc:  # whose record it is must not be guessed
                    delay = backoff.next()
                    log.warning("audit_sender_retry", error=_describe(exc), retry_in_s=delay)
                    await asyncio.sleep(delay)
        limit = self.bus.settings.max_message_bytes
        return [receive(message, senders[message.user_id], limit) for message in batch]

    async def _store(self, batch: list[Received], redelivered: bool) -> int:
        """Append the batch's new records; retries through database outages.

        A batch is first written as if none of it were stored, unless a delivery in it
        says it came before: a record's id is unique in the store, so a repeat makes
        that write fail, and only then are the stored records looked up. A batch of
        first deliveries, nearly every one, costs one write and no read.
        """
        backoff = Backoff(0.1, 5.0)
        looked_up = redelivered
        while True:
            try:
                return await self._append(batch, looked_up)
            except PyMongoError as exc:
                if not looked_up and _repeats_a_record(exc):
                    log.debug("audit_batch_repeats", size=len(batch))
                else:
                    delay = backoff.next()
                    log.warning("audit_store_retry", error=_describe(exc), retry_in_s=delay)
                    await asyncio.sleep(delay)
                # Part of the batch may be stored: reload the head, and the retry finds
                # those records stored and appends only the rest.
                looked_up = True
                with contextlib.suppress(PyMongoError):
                    self._head = await self._load_head()

    async def _append(self, batch: list[Received], look_up: bool) -> int:
        records: list[dict[str, Any]] = []
        head = self._head
        taken: dict[str, str] = {}
        if look_up:
            taken = await self.store.digests({i for r in batch for i in (r.id, r.alt_id)})
        for item, record_id in self._new(batch, taken):
            record = item.record(record_id)
            head = link(head, record)
            records.append(record)
        if records:
            await self.store.insert(records)
            self._head = head
            self.notifier.advance(head.seq, records)
            self._measure(records)
        return len(records)

    def _measure(self, records: list[dict[str, Any]]) -> None:
        now = utcnow()
        valid = sum(1 for record in records if record["valid"])
        self.stored.labels("true").inc(valid)
        self.stored.labels("false").inc(len(records) - valid)
        for record in records:
            self.ingest_lag.observe(max(0.0, (now - record["occurred_at"]).total_seconds()))

    @staticmethod
    def _new(batch: list[Received], taken: dict[str, str]) -> list[tuple[Received, str]]:
        """The deliveries not stored yet (`taken`: the digest of each stored record
        among the batch's ids), each with the id to store it under.

        A delivery is already stored when a record has its id and its body's digest: a
        redelivery, or a repeat by the publisher. A different body under an id already
        taken is not a repeat and is kept too, under `<id>~<digest>`, so that reusing
        an id cannot hide a message from the audit.
        """
        new: list[tuple[Received, str]] = []
        for item in batch:
            for record_id in (item.id, item.alt_id):
                digest = taken.get(record_id)
                if digest is None:
                    taken[record_id] = item.digest
                    new.append((item, record_id))
                    break
                if digest == item.digest:
                    break
        return new

    async def _settle(self, batch: list[AbstractIncomingMessage], *, ack: bool) -> None:
        """Acknowledge (or hand back) a batch with one frame.

        The batch holds the channel's oldest unsettled deliveries (they are taken in
        order, and each batch is settled before the next is taken), so settling its
        last one with `multiple` settles exactly the batch.
        """
        last = batch[-1]
        try:
            await (last.ack(multiple=True) if ack else last.nack(multiple=True, requeue=True))
        except Exception as exc:  # the writer goes on whatever the broker did
            # The channel closed under us: the broker redelivers, and what is stored
            # already is recognised then.
            log.warning("audit_ack_failed", size=len(batch), error=repr(exc))

    async def _load_head(self) -> Head:
        last = await self.store.last()
        return Head() if last is None else Head(last["seq"], last["hash"])


def _repeats_a_record(exc: PyMongoError) -> bool:
    """Whether a write of blocks was refused only for keys already stored: a record
    stored before, or a block where another writer's is (`seq`)."""
    if not isinstance(exc, BulkWriteError):
        return False
    errors = exc.details.get("writeErrors") or []
    return bool(errors) and all(error.get("code") == DUPLICATE_KEY for error in errors)


def _describe(exc: PyMongoError) -> str:
    """A storage error in one short line (a bulk error's repr holds whole documents)."""
    if isinstance(exc, BulkWriteError):
        errors = exc.details.get("writeErrors") or [{}]
        return f"bulk write refused: {errors[0].get('code')} {errors[0].get('errmsg', '')[:300]}"
    return repr(exc)[:500]
