"""The message bus: publish with confirms, and the one consume wrapper.

Every service talks to RabbitMQ through `Bus`. Publishing waits for the broker's
confirm and retries across a reconnect, so a returned `publish` means the message is
stored. Consuming goes through `Bus.consume`, which decodes, validates, authorizes and
runs the handler inside the delivery's ack scope; it is the only place that catches
broad exceptions. Invalid messages are dead-lettered with a reason header and produce
a `message.rejected` event; they never crash a consumer and are never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import ValidationError
from yarl import URL

from shared.envelope import Envelope
from shared.messages.base import Payload
from shared.messages.catalog import CATALOG, DEAD, EVENTS
from shared.messages.system import MessageRejected
from shared.settings import AmqpSettings
from shared.topology import declare_exchanges, declare_queue

log = structlog.get_logger("medhive.bus")


class Rejected(Exception):
    """The message is wrong and will stay wrong: dead-letter it with this reason."""


class Retry(Exception):
    """A transient failure: return the message to the queue to be tried again."""


@dataclass(frozen=True)
class Incoming:
    """A delivery that passed decoding and validation."""

    envelope: Envelope
    payload: Payload
    user_id: str | None
    routing_key: str
    redelivered: bool


Handler = Callable[[Incoming], Awaitable[None]]
#: Checks who sent a message; returns the envelope to hand on (e.g. with the tenant
#: filled from the AMQP user) or raises `Rejected`.
Authorizer = Callable[[Envelope, str | None], Envelope]

_PUBLISH_ERRORS = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    asyncio.TimeoutError,
    RuntimeError,
)


class Bus:
    """One robust connection per service, one confirmed channel for publishing."""

    def __init__(self, settings: AmqpSettings, source: str) -> None:
        self.settings = settings
        self.source = source
        self.user = URL(settings.url.get_secret_value()).user or "guest"
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._consumers: list[Consumer] = []

    @property
    def connection(self) -> AbstractRobustConnection:
        assert self._connection is not None, "Bus.connect() first"
        return self._connection

    async def connect(self) -> None:
        self._connection = await aio_pika.connect_robust(
            self.settings.url.get_secret_value(),
            client_properties={"connection_name": self.source},
        )
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._exchanges = await declare_exchanges(self._channel)

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop consumers (letting handlers finish), then close; bounded when the
        broker is unreachable, so shutdown never hangs on a reconnect loop."""
        for consumer in self._consumers:
            await consumer.stop(grace_s)
        if self._connection is not None:
            try:
                await asyncio.wait_for(self._connection.close(), 5)
            except (TimeoutError, aiormq.exceptions.AMQPError, RuntimeError):
                log.warning("bus_close_unclean", source=self.source)

    # -- publishing ---------------------------------------------------------------

    def envelope(self, type_: str, payload: Payload, **fields: Any) -> Envelope:
        """A new envelope from this service; `fields` are the envelope's own fields."""
        if not isinstance(payload, CATALOG[type_].model):
            raise TypeError(f"{type_} carries {CATALOG[type_].model.__name__}")
        return Envelope(
            type=type_, source=self.source, payload=payload.model_dump(mode="json"), **fields
        )

    async def emit(
        self, type_: str, payload: Payload, *, node_id: str | None = None, **fields: Any
    ) -> Envelope:
        """Build and publish a message; returns its envelope."""
        envelope = self.envelope(type_, payload, **fields)
        await self.publish(envelope, node_id=node_id)
        return envelope

    async def publish(
        self,
        envelope: Envelope,
        *,
        routing_key: str | None = None,
        node_id: str | None = None,
        deadline_s: float = 60.0,
    ) -> None:
        """Publish and wait for the broker's confirm, retrying through reconnects.

        Gives up after `deadline_s` with the last error: the caller keeps whatever it
        was going to publish (an outbox, an unacked delivery) and tries again later.
        """
        entry = CATALOG[envelope.type]
        key = routing_key or entry.key_pattern.format(node_id=node_id)
        message = aio_pika.Message(
            body=envelope.model_dump_json().encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(envelope.id),
            type=envelope.type,
            user_id=self.user,
            app_id=self.source,
            correlation_id=envelope.correlation_id,
            timestamp=envelope.occurred_at,
        )
        await self._publish_raw(entry.exchange, key, message, deadline_s)

    async def _publish_raw(
        self, exchange: str, key: str, message: aio_pika.Message, deadline_s: float
    ) -> None:
        give_up = time.monotonic() + deadline_s
        delay = 0.1
        while True:
            try:
                await self._exchanges[exchange].publish(message, key, timeout=10)
                return
            except _PUBLISH_ERRORS as exc:
                if time.monotonic() + delay > give_up:
                    raise
                log.warning("publish_retry", exchange=exchange, key=key, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def dead_letter(self, message: AbstractIncomingMessage, queue: str, reason: str) -> None:
        """Copy a delivery to `medhive.dead` with the reason; the caller then acks it."""
        headers = dict(message.headers or {})
        headers.update({"x-medhive-reason": reason[:1000], "x-medhive-queue": queue})
        copy = aio_pika.Message(
            body=message.body,
            headers=headers,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            type=message.type,
            app_id=message.app_id,
            timestamp=message.timestamp,
        )
        await self._publish_raw(DEAD, message.routing_key or "", copy, 60.0)

    # -- consuming ----------------------------------------------------------------

    async def consume(
        self,
        queue: str,
        bindings: list[tuple[str, str]],
        handlers: dict[str, Handler],
        *,
        authorize: Authorizer | None = None,
        prefetch: int | None = None,
    ) -> Consumer:
        """Start consuming `queue` (declared and bound here) with a handler per type."""
        consumer = Consumer(self, queue, handlers, authorize)
        await consumer.start(bindings, prefetch or self.settings.prefetch)
        self._consumers.append(consumer)
        return consumer


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
        self._tag: str | None = None
        self._ordered = KeyedLocks()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self, bindings: list[tuple[str, str]], prefetch: int) -> None:
        channel = await self.bus.connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        exchanges = await declare_exchanges(channel)
        self._queue = await declare_queue(
            channel, self.queue_name, bindings, exchanges, self.bus.settings.delivery_limit
        )
        self._tag = await self._queue.consume(self._on_message)

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

    def _decode(self, message: AbstractIncomingMessage) -> Incoming:
        try:
            envelope = Envelope.model_validate_json(message.body)
        except ValidationError as exc:
            raise Rejected(f"not a medhive envelope: {_short(exc)}") from exc
        entry = CATALOG.get(envelope.type)
        if entry is None or envelope.type not in self.handlers:
            raise Rejected(f"unknown message type {envelope.type!r} for queue {self.queue_name}")
        if envelope.version != 1:
            raise Rejected(f"unsupported version {envelope.version} of {envelope.type}")
        try:
            payload = entry.model.model_validate(envelope.payload)
        except ValidationError as exc:
            raise Rejected(f"invalid {envelope.type} payload: {_short(exc)}") from exc
        user_id = message.user_id
        if self.authorize is not None:
            envelope = self.authorize(envelope, user_id)
        return Incoming(
            envelope, payload, user_id, message.routing_key or "", bool(message.redelivered)
        )

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        try:
            incoming = self._decode(message)
        except Rejected as exc:
            await self._reject(message, str(exc))
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
                        await self._reject(message, str(exc))
                        return
                    except Retry as exc:
                        log.warning("handler_retry", queue=self.queue_name, reason=str(exc))
                        await asyncio.sleep(_backoff(message))
                        await message.nack(requeue=True)
                        return
                    except Exception:
                        # A bug or an outage: requeue after a backoff that grows with the
                        # delivery count, so a passing outage does not use up the delivery
                        # limit at once; a message that fails every time is dead-lettered.
                        log.exception("handler_failed", queue=self.queue_name)
                        await asyncio.sleep(_backoff(message))
                        await message.nack(requeue=True)
                        return
                    await message.ack()
                    log.debug(
                        "message_handled",
                        queue=self.queue_name,
                        duration_ms=round((time.perf_counter() - started) * 1000, 2),
                    )
        except aiormq.exceptions.AMQPError as exc:
            # The channel closed under us (broker restart): the broker redelivers.
            log.warning("ack_failed", queue=self.queue_name, error=repr(exc))

    async def _reject(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Dead-letter with the reason, announce it, then ack the original."""
        log.warning("message_rejected", queue=self.queue_name, reason=reason)
        await self.bus.dead_letter(message, self.queue_name, reason)
        rejected = MessageRejected(
            queue=self.queue_name,
            reason=reason,
            message_id=message.message_id,
            message_type=message.type,
            routing_key=message.routing_key,
            user_id=message.user_id,
            body_excerpt=message.body[:512].decode("utf-8", "replace"),
        )
        # No tenant: a rejected body's claims are unverified, so only operators see it.
        await self.bus.emit(
            "message.rejected", rejected, causation_id=message.message_id, actor=message.user_id
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


def _backoff(message: AbstractIncomingMessage) -> float:
    """Seconds to wait before requeueing: 0.2 s doubling per earlier delivery, up to 10 s.

    Quorum queues count deliveries in the `x-delivery-count` header.
    """
    count = (message.headers or {}).get("x-delivery-count", 0)
    tries = count if isinstance(count, int) else 0
    return float(min(0.2 * 2**tries, 10.0))


def _short(exc: ValidationError) -> str:
    """A one-line summary of a validation error: field path and message."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


__all__ = ["EVENTS", "Bus", "Consumer", "Handler", "Incoming", "Rejected", "Retry"]
