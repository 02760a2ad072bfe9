"""RabbitMQ topology, declared in one place: exchanges, queue arguments, queue names.

What each queue takes is its service's handler table (`shared.handlers`); its name is
here, so that every queue of the system can be read in one list.
"""

from __future__ import annotations

from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from shared.messages.catalog import COMMANDS, DEAD, EVENTS, TENANTS

#: Where dead letters wait for an operator, with the reason in their headers.
DEAD_LETTER_QUEUE = "medhive.dead"
#: Bounds of the dead-letter queue. Past them the oldest letters go first: every one
#: of them is in the audit trail already (the original and its `message.rejected`), so
#: the queue is an operator's working set for `medhive dead`, not the record.
DEAD_LETTER_BOUNDS: dict[str, Any] = {
    "x-max-length": 10_000,
    "x-max-length-bytes": 256 * 1024 * 1024,
    "x-message-ttl": 14 * 24 * 3600 * 1000,
    "x-overflow": "drop-head",
}


#: The consumer queues, by the service that consumes them.
SCHEDULER_COMMANDS = "scheduler.commands"  # job.submit and job.cancel, from other systems
SCHEDULER_REPORTS = "scheduler.reports"  # what node agents and the datacache report
SCHEDULER_WEBHOOKS = "scheduler.webhooks"  # job events of tenants that have webhooks
DATACACHE_COMMANDS = "datacache.commands"
NETGW_REQUESTS = "netgw.requests"
NODE_COMMANDS = "node.{node_id}"  # one per node agent
AUDIT_ALL = "audit.all"  # every message of every exchange, to be recorded


def node_queue(node_id: str) -> str:
    """The queue of one node agent."""
    return NODE_COMMANDS.format(node_id=node_id)


async def declare_exchanges(channel: AbstractChannel) -> dict[str, AbstractExchange]:
    """Declare the four durable topic exchanges and the dead-letter queue."""
    exchanges = {
        name: await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        for name in (COMMANDS, EVENTS, TENANTS, DEAD)
    }
    dead = await channel.declare_queue(
        DEAD_LETTER_QUEUE,
        durable=True,
        arguments={"x-queue-type": "quorum", **DEAD_LETTER_BOUNDS},
    )
    await dead.bind(exchanges[DEAD], "#")
    return exchanges


def queue_arguments(delivery_limit: int) -> dict[str, Any]:
    """Quorum queue with a delivery limit, dead-lettering to `medhive.dead`.

    The delivery limit catches poison messages that crash a handler in a loop; the
    consume wrapper dead-letters invalid messages itself, with a reason header.
    """
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD,
    }


async def declare_queue(
    channel: AbstractChannel,
    name: str,
    bindings: list[tuple[str, str]],
    exchanges: dict[str, AbstractExchange],
    delivery_limit: int,
) -> AbstractQueue:
    """Declare a durable consumer queue and bind it to (exchange, routing key) pairs."""
    queue = await channel.declare_queue(
        name, durable=True, arguments=queue_arguments(delivery_limit)
    )
    for exchange_name, key in bindings:
        await queue.bind(exchanges[exchange_name], key)
    return queue


__all__ = [
    "AUDIT_ALL",
    "COMMANDS",
    "DATACACHE_COMMANDS",
    "DEAD",
    "DEAD_LETTER_QUEUE",
    "EVENTS",
    "NETGW_REQUESTS",
    "NODE_COMMANDS",
    "SCHEDULER_COMMANDS",
    "SCHEDULER_REPORTS",
    "SCHEDULER_WEBHOOKS",
    "TENANTS",
    "declare_exchanges",
    "node_queue",
]
