"""The reference for netgw's request latency: the same round trips with nothing of medhive.

A responder process (`python -m bench.bare_rpc AMQP_URL MONGO_URL`) consumes a quorum
queue, as netgw does, and answers each request after one `insert_one` into a
collection with a unique index, as a lease or a forward costs netgw one stored
document. `BareClient` sends requests from the bench process with plain aio-pika:
a persistent message with a publisher confirm, and the reply read from an exclusive
queue. What medhive adds on top of this floor is its own: envelopes and their
validation, the consume wrapper, the data plane (dnsmasq, nftables, the reachability
check) and the event that each answer publishes for the audit.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from pymongo import ASCENDING, AsyncMongoClient

QUEUE = "bench.bare_rpc"
DATABASE = "bench_bare_rpc"


async def respond(amqp_url: str, mongo_url: str) -> None:
    """Answer every request after storing one document; prints 'ready' once consuming."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url)
    documents = client[DATABASE]["requests"]
    await documents.create_index([("slot", ASCENDING)], unique=True)
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=32)
    queue = await channel.declare_queue(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    slots = iter(range(1 << 62))

    async def on_request(message: AbstractIncomingMessage) -> None:
        await documents.insert_one({"_id": message.correlation_id, "slot": next(slots)})
        reply = aio_pika.Message(b"ok", correlation_id=message.correlation_id)
        await channel.default_exchange.publish(reply, routing_key=message.reply_to or "")
        await message.ack()

    await queue.consume(on_request)
    print("ready", flush=True)
    await asyncio.Future()  # until killed


class BareClient:
    """Sends requests to the responder and waits for each reply."""

    def __init__(self, amqp_url: str) -> None:
        self.amqp_url = amqp_url
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._reply_to = ""

    async def connect(self) -> None:
        self._connection = await aio_pika.connect(self.amqp_url)
        self._channel = await self._connection.channel(publisher_confirms=True)
        replies = await self._channel.declare_queue(exclusive=True)
        self._reply_to = replies.name
        await replies.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._waiting.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(None)

    async def request(self) -> None:
        assert self._channel is not None
        key = uuid.uuid4().hex
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        message = aio_pika.Message(
            b"{}",
            correlation_id=key,
            reply_to=self._reply_to,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self._channel.default_exchange.publish(message, routing_key=QUEUE)
        await asyncio.wait_for(future, 30)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


def start_responder(amqp_url: str, mongo_url: str) -> subprocess.Popen[bytes]:
    """The responder in its own process, once it consumes."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.bare_rpc", amqp_url, mongo_url], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != b"ready":
        process.kill()
        raise RuntimeError("the bare responder did not start")
    return process


if __name__ == "__main__":
    asyncio.run(respond(sys.argv[1], sys.argv[2]))
