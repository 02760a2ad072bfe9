"""The dead-letter queue, for operators: list, show, replay and purge letters.

A letter is a message some consumer refused (its reason in `x-medhive-reason`) or one
that failed every delivery (RabbitMQ's own `x-death`). Reading the queue takes each
letter without acknowledging it; what is not replayed or purged goes back when the
channel closes, so looking changes nothing but the order. A replay publishes the
letter again where it first went, with its own properties, `user_id` included (the
service account may publish as another user: the setup gives it RabbitMQ's
`impersonator` tag), so it is judged exactly as the first time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from shared.bus import copy_of
from shared.settings import AmqpSettings
from shared.topology import DEAD_LETTER_QUEUE, declare_exchanges

#: Headers the services add to a letter, dropped again on replay.
_OWN_HEADERS = ("x-medhive-reason", "x-medhive-queue", "x-medhive-exchange", "x-medhive-user-id")


def _first_death(letter: AbstractIncomingMessage) -> dict[str, Any]:
    """RabbitMQ's own record of why it dead-lettered the message, if it did."""
    deaths = (letter.headers or {}).get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return dict(deaths[0])
    return {}


def describe(letter: AbstractIncomingMessage) -> dict[str, Any]:
    """What an operator needs to decide about a letter."""
    headers = letter.headers or {}
    death = _first_death(letter)
    reason = headers.get("x-medhive-reason")
    if reason is None and death:
        reason = f"{death.get('reason')} (after {death.get('count')} deliveries)"
    queue = headers.get("x-medhive-queue") or death.get("queue")
    sent = letter.timestamp.isoformat() if isinstance(letter.timestamp, datetime) else None
    return {
        "message_id": letter.message_id,
        "type": letter.type,
        "user_id": letter.user_id or _text(headers.get("x-medhive-user-id")) or None,
        "queue": _text(queue),
        "exchange": _origin(letter)[0],
        "routing_key": letter.routing_key,
        "reason": _text(reason),
        "sent_at": sent,
        "bytes": len(letter.body),
    }


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


def _origin(letter: AbstractIncomingMessage) -> tuple[str, str]:
    """The exchange and routing key the letter was first published to."""
    headers = letter.headers or {}
    exchange = _text(headers.get("x-medhive-exchange")) or _text(
        _first_death(letter).get("exchange")
    )
    return exchange or "", letter.routing_key or ""


class DeadLetters:
    """A look into `medhive.dead` on one channel; letters taken stay unacknowledged."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel

    async def take(self, limit: int) -> list[AbstractIncomingMessage]:
        """Up to `limit` letters, oldest first, held until acked or the channel closes."""
        queue = await self.channel.get_queue(DEAD_LETTER_QUEUE, ensure=False)
        letters: list[AbstractIncomingMessage] = []
        while len(letters) < limit:
            letter = await queue.get(no_ack=False, fail=False)
            if letter is None:
                break
            letters.append(letter)
        return letters

    async def replay(self, letter: AbstractIncomingMessage) -> None:
        """Publish the letter again where it first went, then drop it from the queue."""
        exchange_name, key = _origin(letter)
        headers = {k: v for k, v in (letter.headers or {}).items() if k not in _OWN_HEADERS}
        headers.pop("x-death", None)
        message = copy_of(letter, headers)
        exchange = await self.channel.get_exchange(exchange_name, ensure=False)
        await exchange.publish(message, key)
        await letter.ack()

    async def purge_all(self) -> int:
        queue = await self.channel.get_queue(DEAD_LETTER_QUEUE, ensure=False)
        result = await queue.purge()
        return int(result.message_count or 0)


@asynccontextmanager
async def dead_letters(amqp: AmqpSettings) -> AsyncIterator[DeadLetters]:
    """The dead-letter queue over the service account's connection."""
    connection = await aio_pika.connect(amqp.url.get_secret_value())
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare_exchanges(channel)
        yield DeadLetters(channel)
    finally:
        await connection.close()
