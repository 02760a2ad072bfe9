"""The message bus: one connection per service, publishing with confirms.

Every service talks to RabbitMQ through `Bus`. Publishing waits for the broker's
confirm and retries across a reconnect, so a returned `publish` means the message is
stored. Consuming goes through `Bus.consume`, which starts the one consume wrapper of
`shared.consume` on a service's handler table (`shared.handlers`); the wrapper gets a
channel, its limits and `Bus.refuse`, and knows nothing else of the bus.

One module because publishing, request and reply, dead-lettering and consuming all run
on the one connection and its one confirmed publishing channel, which `_renew_channel`
may replace under any of them; the reply queue, the waiting requests and the started
consumers live on that connection and are closed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from datetime import datetime
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
from yarl import URL

from shared import broker
from shared.backoff import Backoff
from shared.consume import Authorizer, Consumer, Incoming, Limits
from shared.envelope import Envelope, derived_id, utcnow
from shared.handlers import H, HandlerTable
from shared.identity import Sender
from shared.messages.base import Payload
from shared.messages.catalog import CATALOG, COMMANDS, DEAD
from shared.messages.system import CommandRejected, MessageRejected
from shared.settings import AmqpSettings
from shared.topology import declare_exchanges

log = structlog.get_logger("medhive.bus")


#: Failures of a publish that pass with time (a reconnect, a new channel). Not any
#: `RuntimeError`: that is how a bug shows, and retrying it would hide it for a minute.
_PUBLISH_ERRORS = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    asyncio.TimeoutError,
)


class Unroutable(Exception):
    """A command was published but no queue is bound for its routing key."""


class NoReply(Exception):
    """A request got no answer in time (the service may be down or busy): ask again."""


def copy_of(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """A delivery as a message to publish again: the same body and properties (the
    sender's `user_id` included), persistent, with `headers`."""
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        user_id=message.user_id,
        app_id=message.app_id,
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
        self._replies: AbstractQueue | None = None
        self._waiting: dict[str, asyncio.Future[Envelope]] = {}
        self._renewing = asyncio.Lock()
        #: Since when this bus has been connected (its consumers restored after a
        #: reconnect), and so hears what others publish; None while the link is down.
        #: What was published meanwhile for a queue it alone reads waits for it; what
        #: was not published at all (a node's heartbeat, while the broker was away) is
        #: silence that says nothing of the sender.
        self.hearing_since: datetime | None = None

    @property
    def connection(self) -> AbstractRobustConnection:
        assert self._connection is not None, "Bus.connect() first"
        return self._connection

    @property
    def consumers(self) -> tuple[Consumer, ...]:
        """The consumers started on this bus (what each handled: `Consumer.tally`)."""
        return tuple(self._consumers)

    async def connect(self) -> None:
        self._connection = await broker.connect(self.settings, self.source)
        self.hearing_since = utcnow()
        self._connection.close_callbacks.add(self._deaf)
        self._connection.reconnect_callbacks.add(self._hearing)
        await self._open_channel()

    def _deaf(self, *_: Any) -> None:
        self.hearing_since = None

    def _hearing(self, *_: Any) -> None:
        self.hearing_since = utcnow()

    async def _open_channel(self) -> None:
        """The publishing channel: confirmed, and a mandatory message that no queue
        takes comes back as an error."""
        self._channel = await self.connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._exchanges = await declare_exchanges(self._channel)
        self._exchanges[""] = self._channel.default_exchange

    async def _renew_channel(self, refused: AbstractChannel | None) -> None:
        """Replace the publishing channel after the broker refused a message on it.

        A quorum queue refuses (nacks) what it cannot store while it has no leader, as
        after the loss of the broker node that led it. RabbitMQ 3.10 keeps refusing on
        a channel that published during the election even once a new leader is there
        (measured: still after 20 s), while a new channel is served at once. Concurrent
        publishers that were refused on the same channel renew it once."""
        async with self._renewing:
            if self._channel is not refused:
                return  # renewed meanwhile
            if refused is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(refused.close(), 5)
            try:
                await self._open_channel()
            except RuntimeError:
                # aio-pika's "Connection was not opened" while it reconnects: the next
                # try renews the channel again. While connected it is a bug.
                if self.connection.connected.is_set():
                    raise

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
        """A new envelope from this service; `fields` are the envelope's own fields
        (a fresh `id` unless one is given: see `shared.envelope.derived_id`)."""
        entry = CATALOG[type_]
        if not isinstance(payload, entry.model):
            raise TypeError(f"{type_} carries {entry.model.__name__}")
        if entry.for_tenants and not fields.get("tenant"):
            raise ValueError(f"{type_} goes to a tenant's channel: it needs a tenant")
        fields.setdefault("id", uuid.uuid4())
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
        reply_to: str | None = None,
        exchange: str | None = None,
        body: bytes | None = None,
    ) -> None:
        """Publish and wait for the broker's confirm, retrying through reconnects.

        Gives up after `deadline_s` with the last error: the caller keeps whatever it
        was going to publish (an outbox, an unacked delivery) and tries again later.
        `body` is the envelope serialized already (an outbox stores it so).
        """
        entry = CATALOG[envelope.type]
        key = routing_key or entry.key_pattern.format(node_id=node_id, tenant=envelope.tenant)
        message = aio_pika.Message(
            body=envelope.model_dump_json().encode() if body is None else body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(envelope.id),
            type=envelope.type,
            user_id=self.user,
            app_id=self.source,
            correlation_id=envelope.correlation_id,
            timestamp=envelope.occurred_at,
            reply_to=reply_to,
        )
        # A command nobody can receive is an error, not a silent drop (an event may
        # legitimately have no listener, and a reply a requester that gave up).
        exchange = entry.exchange if exchange is None else exchange
        mandatory = exchange == COMMANDS
        await self._publish_raw(exchange, key, message, deadline_s, mandatory)

    async def _publish_raw(
        self,
        exchange: str,
        key: str,
        message: aio_pika.Message,
        deadline_s: float,
        mandatory: bool = False,
    ) -> None:
        """Publish until confirmed; raises `Unroutable` for a mandatory message that no
        queue is bound for (not retried: the caller decides when to try again)."""
        give_up = time.monotonic() + deadline_s
        backoff = Backoff(0.1, 2.0)
        while True:
            channel = self._channel
            try:
                await self._exchanges[exchange].publish(
                    message, key, mandatory=mandatory, timeout=10
                )
                return
            except aiormq.exceptions.PublishError as exc:  # returned: no queue took it
                raise Unroutable(f"no queue is bound for {key!r} on {exchange}") from exc
            except (aiormq.exceptions.DeliveryError, *_PUBLISH_ERRORS) as exc:
                delay = backoff.next()
                if time.monotonic() + delay > give_up:
                    raise
                log.warning("publish_retry", exchange=exchange, key=key, error=repr(exc))
                await asyncio.sleep(delay)
                if isinstance(exc, aiormq.exceptions.DeliveryError):  # refused (nack)
                    with contextlib.suppress(*_PUBLISH_ERRORS):
                        await self._renew_channel(channel)

    # -- request and reply -----------------------------------------------------------

    async def request(
        self, type_: str, payload: Payload, *, timeout_s: float = 30.0, **fields: Any
    ) -> Payload:
        """Send a request command and wait for its reply (matched by causation id);
        returns the reply's payload, validated into its catalog model.

        Raises `NoReply` after `timeout_s`. Requests are idempotent by contract, so the
        caller may simply ask again.
        """
        queue = await self._reply_queue()
        envelope = self.envelope(type_, payload, **fields)
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._waiting[str(envelope.id)] = future
        try:
            await self.publish(envelope, reply_to=queue.name)
            reply = await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise NoReply(f"no reply to {type_} within {timeout_s:g} s") from None
        finally:
            self._waiting.pop(str(envelope.id), None)
        return CATALOG[reply.type].model.model_validate(reply.payload)

    async def reply(self, request: Incoming[Payload], envelope: Envelope) -> None:
        """Send `envelope` (caused by `request`) to the requester's reply queue, if any."""
        if request.reply_to:
            await self.publish(envelope, routing_key=request.reply_to, exchange="")

    async def _reply_queue(self) -> AbstractQueue:
        """This connection's own reply queue, declared on first use.

        A client-chosen name (not a server-named one) so the robust connection declares
        the same queue again after a reconnect.
        """
        if self._replies is None:
            channel = await self.connection.channel()
            name = f"medhive.replies.{self.source}.{uuid.uuid4().hex[:12]}"
            queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
            await queue.consume(self._on_reply, no_ack=True)
            self._replies = queue
        return self._replies

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = Envelope.model_validate_json(message.body)
        except ValueError:
            log.warning("reply_undecodable", message_id=message.message_id)
            return
        future = self._waiting.get(str(envelope.causation_id))
        if envelope.type not in CATALOG:
            log.warning("reply_of_unknown_type", message_id=message.message_id)
            return
        if future is not None and not future.done():
            future.set_result(envelope)

    async def dead_letter(self, message: AbstractIncomingMessage, queue: str, reason: str) -> None:
        """Copy a delivery to `medhive.dead` with the reason; the caller then acks it.

        The copy keeps every property of the original, `user_id` included (the service
        account carries RabbitMQ's `impersonator` tag for this), so an operator sees who
        sent it and `medhive dead replay` sends it again as its sender did.
        """
        headers = dict(message.headers or {})
        headers.update(
            {
                "x-medhive-reason": reason[:1000],
                "x-medhive-queue": queue,
                "x-medhive-exchange": message.exchange or "",
                "x-medhive-user-id": message.user_id or "",
            }
        )
        copy = copy_of(message, headers)
        try:
            await self._publish_raw(DEAD, message.routing_key or "", copy, 60.0)
        except aiormq.exceptions.ChannelPreconditionFailed:
            # The service account may not publish as another user (no `impersonator`
            # tag): keep the letter, with its sender in the header only.
            log.warning("dead_letter_without_user_id", user_id=message.user_id)
            copy.user_id = None
            await self._publish_raw(DEAD, message.routing_key or "", copy, 60.0)

    async def refuse(
        self, message: AbstractIncomingMessage, queue: str, reason: str, sender: Sender
    ) -> None:
        """Dead-letter a wrong delivery of `queue` with the reason, and announce it.

        The announcements have ids derived from the message, so a crash before the
        consumer's ack (which makes the broker deliver the message again) repeats them
        under the same ids rather than adding new ones.
        """
        await self.dead_letter(message, queue, reason)
        seen_as = message.message_id or "sha256:" + hashlib.sha256(message.body).hexdigest()
        rejected = MessageRejected(
            queue=queue,
            reason=reason,
            message_id=message.message_id,
            message_type=message.type,
            routing_key=message.routing_key,
            user_id=message.user_id,
            body_excerpt=message.body[:512].decode("utf-8", "replace"),
        )
        # No tenant: the body's claims are unverified, so only operators see it.
        await self.emit(
            "message.rejected",
            rejected,
            id=derived_id("message.rejected", queue, seen_as),
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
            await self.emit(
                "command.rejected",
                refused,
                id=derived_id("command.rejected", queue, seen_as),
                causation_id=message.message_id,
                tenant=sender.tenant,
                actor=sender.user,
            )

    # -- consuming ----------------------------------------------------------------

    async def consume(
        self,
        table: HandlerTable[H],
        target: H,
        *,
        authorize: Authorizer | None = None,
        prefetch: int | None = None,
        node_id: str | None = None,
        bindings: list[tuple[str, str]] | None = None,
    ) -> Consumer:
        """Start consuming `table`'s queue with its handlers bound to `target`.

        The queue is declared and bound here: to every type of the table (`node_id`
        fills the node's queue name and keys), or to `bindings` for a queue whose
        routes change while it runs (one tenant's events at a time).
        """
        consumer = Consumer(
            table.queue_name(node_id),
            table.bind(target),
            authorize,
            Limits(self.settings.max_message_bytes, self.settings.delivery_limit),
            self.refuse,
        )
        routes = table.bindings(node_id) if bindings is None else bindings
        channel = await self.connection.channel()
        await consumer.start(channel, routes, prefetch or self.settings.prefetch)
        self._consumers.append(consumer)
        return consumer


__all__ = ["Bus", "NoReply", "Unroutable", "copy_of"]
