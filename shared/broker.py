"""The connection to RabbitMQ, to one node or to any node of a cluster.

A RabbitMQ cluster keeps working when a minority of its nodes is lost: quorum queues
(every durable queue of medhive's) elect a new leader among the survivors and keep
their messages. A client connects to one node at a time, so surviving the loss of
that node is the client's job: `ClusterConnection` is aio-pika's robust connection
that, whenever its connection fails or drops, tries the next node of the list
(`MEDHIVE_AMQP_URL`, then `MEDHIVE_AMQP_NODES`, round and round). On reconnecting it
declares again what this process consumes and resumes its consumers, as the robust
connection does after a broker restart. What was published but not confirmed when a
node died is published again by its sender, and consumers de-duplicate, as for any
other redelivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import structlog
from aio_pika import RobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

from shared.settings import AmqpSettings

log = structlog.get_logger("medhive.broker")

#: Seconds between connection attempts after one failed (the next node is tried at
#: once when a connection drops).
RECONNECT_INTERVAL_S = 1.0


class ClusterConnection(RobustConnection):
    """A robust connection that moves to the next node when its node fails it."""

    def __init__(self, urls: Sequence[URL], **kwargs: Any) -> None:
        self.nodes = list(urls)
        self._at = 0
        super().__init__(self.nodes[0], **kwargs)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        # Called when the connection drops and when an attempt to connect fails: the
        # robust connection's next attempt goes to the next node.
        if len(self.nodes) > 1 and not self._close_called and not self.is_closed:
            self._at = (self._at + 1) % len(self.nodes)
            self.url = self.nodes[self._at]
            if self.connection_attempt:  # it had been connected: say where it goes now
                log.info("broker_node_next", node=f"{self.url.host}:{self.url.port}")
        await super()._on_connection_close(closing)


async def connect(settings: AmqpSettings, name: str) -> ClusterConnection:
    """Connect to the first node that answers, each tried once in the configured order;
    raises the last node's error when none does (a service does not start without a
    broker: its supervisor starts it again)."""
    urls = settings.urls
    error: BaseException | None = None
    for first in range(len(urls)):
        connection = ClusterConnection(
            urls[first:] + urls[:first],
            client_properties={"connection_name": name},
            reconnect_interval=RECONNECT_INTERVAL_S,
        )
        try:
            await connection.connect()
            return connection
        except CONNECTION_EXCEPTIONS as exc:
            error = exc
            log.warning("broker_node_unreachable", node=f"{urls[first].host}:{urls[first].port}")
            await connection.close()
    assert error is not None
    raise error
