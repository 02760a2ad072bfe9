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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiormq
import structlog
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError

from shared.backoff import Backoff
from shared.envelope import Envelope, derived_id
from shared.identity import Sender
from shared.messages.base import Payload
from shared.messages.catalog import CATALOG
from shared.messages.system import CommandRejected, MessageRejected
from shared.topology import declare_exchanges, declare_queue

if TYPE_CHECKING:
    from shared.bus import Bus

log = structlog.get_logger("medhive.consume")


class Rejected(Exception):
    """The message is wrong and will stay wrong: dead-letter it with this reason."""


class Retry(Exception):
    """A transient failure: return the message to the queue to be tried again."""


@dataclass(frozen=True)
class Incoming:
    """A delivery that passed identification, decoding and validation."""

    envelope: Envelope
    payload: Payload
    sender: Sender
    routing_key: str
    redelivered: bool
    reply_to: str | None = None  # where a request's answer goes (net.* requests)


Handler = Callable[[Incoming], Awaitable[None]]
#: Decides who sent a delivery from its proven AMQP user, before anything of the body
#: is believed; raises `Rejected` for a sender the queue does not take commands from.
Authorizer = Callable[[str | None], Awaitable[Sender]]


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
        self, bus: Bus, queue: str, handlers: dict[str, Handler], authorize: Authorizer | None
    ) -> None:
        self.bus = bus
        self.queue_name = queue
        self.handlers = handlers
        self.authorize = authorize
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

    @property
    def max_bytes(self) -> int:
        return self.bus.settings.max_message_bytes

    async def start(self, bindings: list[tuple[str, str]], prefetch: int) -> None:
        channel = await self.bus.connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        self._exchanges = await declare_exchanges(channel)
        self._queue = await declare_queue(
            channel, self.queue_name, bindings, self._exchanges, self.bus.settings.delivery_limit
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

    def _decode(self, message: AbstractIncomingMessage, sender: Sender) -> Incoming:
        if len(message.body) > self.max_bytes:
            raise Rejected(
                f"message of {len(message.body)} bytes is over the limit of {self.max_bytes}"
            )
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
        """Dead-letter with the reason, announce it, then ack the original.

        The announcements have ids derived from the message, so a crash before the ack
        (which makes the broker deliver the message again) repeats them under the same
        ids rather than adding new ones.
        """
        log.warning("message_rejected", queue=self.queue_name, reason=reason)
        await self.bus.dead_letter(message, self.queue_name, reason)
        self.dead_letters += 1
        seen_as = message.message_id or "sha256:" + hashlib.sha256(message.body).hexdigest()
        rejected = MessageRejected(
            queue=self.queue_name,
            reason=reason,
            message_id=message.message_id,
            message_type=message.type,
            routing_key=message.routing_key,
            user_id=message.user_id,
            body_excerpt=message.body[:512].decode("utf-8", "replace"),
        )
        # No tenant: the body's claims are unverified, so only operators see it.
        await self.bus.emit(
            "message.rejected",
            rejected,
            id=derived_id("message.rejected", self.queue_name, seen_as),
            causation_id=message.message_id,
            actor=message.user_id,
        )
        if sender.tenant is not None:
            refused = CommandRejected(
                reason=reason,
                message_id=message.message_id,
                message_type=message.type,
                user_id=sender.user,
            )
            await self.bus.emit(
                "command.rejected",
                refused,
                id=derived_id("command.rejected", self.queue_name, seen_as),
                causation_id=message.message_id,
                tenant=sender.tenant,
                actor=sender.user,
            )
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
