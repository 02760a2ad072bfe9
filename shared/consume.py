"""The one consume wrapper: identify the sender, bound, decode, validate, run the
handler, ack or dead-letter. It is where a message handler's failure is caught, so no
handler catches broad exceptions to keep a consumer alive.

Deliveries arrive as concurrent tasks; messages of one job (one `correlation_id`) are
handled in delivery order, different jobs in parallel. A message that is wrong and
will stay wrong is copied to `medhive.dead` with an `x-medhive-reason` header and
announced as `message.rejected` (operators only: it quotes the body); when the sender
acts for a tenant, it also learns of it by `command.rejected` on its tenant's channel,
which names the message and the reason but quotes nothing. A handler failure is
requeued after a backoff, and the queue's delivery limit dead-letters a message that
fails every time.

Each consumer counts what it handled, by type and outcome, in a plain dict (`tally`)
that `/metrics` reads when scraped (`shared.metrics`): a few hundred nanoseconds a
delivery.

One module because identifying, bounding, decoding, validating, running the handler and
settling are the steps of one delivery in `Consumer._handle`, each deciding whether the
next runs and how the delivery ends (ack, requeue after `_backoff`, or `Rejected`), under
the per-job lock of `KeyedLocks` and counted in the same `tally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError

from shared.backoff import Backoff
from shared.envelope import Envelope
from shared.identity import Sender
from shared.messages.base import Payload
from shared.messages.catalog import CATALOG
from shared.topology import declare_exchanges, declare_queue

log = structlog.get_logger("medhive.consume")


class Rejected(Exception):
    """The message is wrong and will stay wrong: dead-letter it with this reason."""


class Retry(Exception):
    """A transient failure: return the message to the queue to be tried again."""


#: A message's payload model; `Incoming[JobSubmit]` is a delivery of `job.submit`.
P = TypeVar("P", bound=Payload, covariant=True)


@dataclass(frozen=True)
class Incoming(Generic[P]):
    """A delivery that passed identification, decoding and validation, its payload
    validated into the catalog's model for its type."""

    envelope: Envelope
    payload: P
    sender: Sender
    routing_key: str
    redelivered: bool
    reply_to: str | None = None  # where a request's answer goes (net.* requests)


Handler = Callable[[Incoming[Any]], Awaitable[None]]
#: Decides who sent a delivery from its proven AMQP user, before anything of the body
#: is believed; raises `Rejected` for a sender the queue does not take commands from.
Authorizer = Callable[[str | None], Awaitable[Sender]]
#: Dead-letters a wrong delivery and announces it: (delivery, queue, reason, sender).
#: The consumer acks the delivery once it returns.
Refusal = Callable[[AbstractIncomingMessage, str, str, Sender], Awaitable[None]]


@dataclass(frozen=True)
class Limits:
    """What a consumer enforces on every delivery."""

    max_bytes: int  # a larger body is rejected unread
    delivery_limit: int  # the queue's, after which RabbitMQ dead-letters a message


def trusted_senders(users: AbstractSet[str]) -> Authorizer:
    """Take messages only from the medhive service accounts in `users`."""

    async def identify(user_id: str | None) -> Sender:
        if user_id not in users:
            raise Rejected(f"AMQP user {user_id!r} may not send to this queue")
        return Sender(user_id, service=True)

    return identify


class Consumer:
    """Runs handlers for one queue; messages of one job are handled in order."""

    def __init__(
        self,
        queue: str,
        handlers: dict[str, Handler],
        authorize: Authorizer | None,
        limits: Limits,
        refuse: Refusal,
    ) -> None:
        self.queue_name = queue
        self.handlers = handlers
        self.authorize = authorize
        self.limits = limits
        self.refuse = refuse
        self._queue: AbstractQueue | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._tag: str | None = None
        self._ordered = KeyedLocks()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        #: Deliveries handled, by (message type, outcome: ok, rejected or retried).
        self.tally: Counter[tuple[str, str]] = Counter()
        #: Deliveries copied to the dead-letter exchange.
        self.dead_letters = 0

    async def start(
        self, channel: AbstractChannel, bindings: list[tuple[str, str]], prefetch: int
    ) -> None:
        """Declare and bind the queue on `channel` (this consumer's own), then consume."""
        await channel.set_qos(prefetch_count=prefetch)
        self._exchanges = await declare_exchanges(channel)
        self._queue = await declare_queue(
            channel, self.queue_name, bindings, self._exchanges, self.limits.delivery_limit
        )
        self._tag = await self._queue.consume(self._on_message)

    async def bind(self, bindings: list[tuple[str, str]]) -> None:
        """Route more to this queue while it is consumed (a binding the broker has
        already is kept once; the connection restores them after a reconnect)."""
        assert self._queue is not None, "start() first"
        for exchange, key in bindings:
            await self._queue.bind(self._exchanges[exchange], key)

    async def unbind(self, bindings: list[tuple[str, str]]) -> None:
        """Route these no more to this queue."""
        assert self._queue is not None, "start() first"
        for exchange, key in bindings:
            await self._queue.unbind(self._exchanges[exchange], key)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking deliveries, then let in-flight handlers finish (bounded)."""
        if self._queue is not None and self._tag is not None:
            try:
                await asyncio.wait_for(self._queue.cancel(self._tag), 5)
            except Exception:  # the connection may already be gone at shutdown
                log.debug("consumer_cancel_failed", queue=self.queue_name)
            self._tag = None
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            log.warning("consumer_stop_timeout", queue=self.queue_name)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        self._idle.clear()
        try:
            await self._handle(message)
        finally:
            self._in_flight.discard(task)
            if not self._in_flight:
                self._idle.set()

    def _count(self, kind: str | None, outcome: str) -> None:
        """Tally one delivery; a type this queue does not take counts as `other`, so a
        sender's made-up types cannot make new series."""
        self.tally[(kind if kind in self.handlers else "other", outcome)] += 1

    async def _identify(self, message: AbstractIncomingMessage) -> Sender:
        if self.authorize is None:
            return Sender(message.user_id)
        return await self.authorize(message.user_id)

    def _decode(self, message: AbstractIncomingMessage, sender: Sender) -> Incoming[Payload]:
        if len(message.body) > (most := self.limits.max_bytes):
            raise Rejected(f"message of {len(message.body)} bytes is over the limit of {most}")
        try:
            envelope = Envelope.model_validate_json(message.body)
        except ValidationError as exc:
            raise Rejected(f"not a medhive envelope: {summarize(exc)}") from exc
        if message.message_id is not None and message.message_id != str(envelope.id):
            raise Rejected("the message_id property differs from the envelope's id")
        entry = CATALOG.get(envelope.type)
        if entry is None or envelope.type not in self.handlers:
            raise Rejected(f"unknown message type {envelope.type!r} for queue {self.queue_name}")
        if envelope.version != 1:
            raise Rejected(f"unsupported version {envelope.version} of {envelope.type}")
        try:
            if sender.tenant is None:
                payload = entry.model.model_validate(envelope.payload)
            else:
                # Another system's command is read as strictly as an HTTP body: no
                # "3600" taken for a number, so both ways in give one verdict.
                raw = json.dumps(envelope.payload)
                payload = entry.model.model_validate_json(raw, strict=True)
        except ValidationError as exc:
            raise Rejected(f"invalid {envelope.type} payload: {summarize(exc)}") from exc
        if sender.tenant is not None:
            # An integrator acts for its tenant, whatever the message claims.
            envelope = envelope.model_copy(update={"tenant": sender.tenant, "actor": sender.user})
        return Incoming(
            envelope,
            payload,
            sender,
            message.routing_key or "",
            bool(message.redelivered),
            message.reply_to,
        )

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        sender = Sender(message.user_id)
        try:
            sender = await self._identify(message)
            incoming = self._decode(message, sender)
        except Rejected as exc:
            self._count(message.type, "rejected")
            await self._reject(message, str(exc), sender)
            return
        except Exception:  # the identity store is away: try again later
            log.exception("identify_failed", queue=self.queue_name)
            self._count(message.type, "retried")
            await asyncio.sleep(_backoff(message))
            await message.nack(requeue=True)
            return
        envelope = incoming.envelope
        key = envelope.correlation_id or str(envelope.id)
        try:
            async with self._ordered.hold(key):
                with structlog.contextvars.bound_contextvars(
                    message_id=str(envelope.id),
                    message_type=envelope.type,
                    job_id=envelope.correlation_id,
                    tenant=envelope.tenant,
                ):
                    try:
                        await self.handlers[envelope.type](incoming)
                    except Rejected as exc:
                        self._count(envelope.type, "rejected")
                        await self._reject(message, str(exc), sender)
                        return
                    except Retry as exc:
                        log.warning("handler_retry", queue=self.queue_name, reason=str(exc))
                        self._count(envelope.type, "retried")
                        await asyncio.sleep(_backoff(message))
                        await message.nack(requeue=True)
                        return
                    except Exception:
                        # A bug or an outage: requeue after a backoff that grows with the
                        # delivery count, so a passing outage does not use up the delivery
                        # limit at once; a message that fails every time is dead-lettered.
                        log.exception("handler_failed", queue=self.queue_name)
                        self._count(envelope.type, "retried")
                        await asyncio.sleep(_backoff(message))
                        await message.nack(requeue=True)
                        return
                    await message.ack()
                    self._count(envelope.type, "ok")
                    log.debug(
                        "message_handled",
                        queue=self.queue_name,
                        duration_ms=round((time.perf_counter() - started) * 1000, 2),
                    )
        except aiormq.exceptions.AMQPError as exc:
            # The channel closed under us (broker restart): the broker redelivers.
            log.warning("ack_failed", queue=self.queue_name, error=repr(exc))

    async def _reject(self, message: AbstractIncomingMessage, reason: str, sender: Sender) -> None:
        """Dead-letter with the reason and announce it (`refuse`), then ack the original."""
        log.warning("message_rejected", queue=self.queue_name, reason=reason)
        await self.refuse(message, self.queue_name, reason, sender)
        self.dead_letters += 1
        await message.ack()


class KeyedLocks:
    """One FIFO lock per key, dropped when nobody holds or awaits it.

    Deliveries run as concurrent tasks; holding the job's lock keeps the messages of
    one job in delivery order while different jobs proceed in parallel.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


#: Before a failed delivery is requeued: 0.2 s doubling per earlier delivery, up to 10 s.
REQUEUE_BACKOFF = Backoff(0.2, 10.0)


def _backoff(message: AbstractIncomingMessage) -> float:
    """Seconds to wait before requeueing (quorum queues count deliveries in the
    `x-delivery-count` header)."""
    count = (message.headers or {}).get("x-delivery-count", 0)
    return REQUEUE_BACKOFF.after(count if isinstance(count, int) else 0)


def summarize(exc: ValidationError) -> str:
    """A one-line summary of a validation error: field path and message."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
