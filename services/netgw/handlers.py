"""What netgw consumes: node agents' requests for a VM's network.

Each request is answered with the event that records its outcome, published for audit
and sent to the requester's reply queue. The table at the end is the only place netgw
names the message types it takes (`shared.handlers`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import structlog

from services.netgw.gateway import Gateway, Refused
from shared import topology
from shared.bus import Bus
from shared.consume import Incoming
from shared.handlers import HandlerTable, on
from shared.messages.base import Payload
from shared.messages.net import (
    NetFailed,
    NetForward,
    NetForwarded,
    NetLease,
    NetLeased,
    NetRelease,
)

log = structlog.get_logger("medhive.netgw")

#: The requests netgw answers; each names the job and attempt it is for.
Request = NetLease | NetForward | NetRelease


class RequestHandlers:
    def __init__(self, gateway: Gateway, bus: Bus) -> None:
        self.gateway = gateway
        self.bus = bus

    async def lease(self, incoming: Incoming[NetLease]) -> None:
        req = incoming.payload

        async def leased() -> NetLeased:
            lease = await self.gateway.lease(req, incoming.envelope.tenant)
            return NetLeased(
                job_id=req.job_id,
                attempt=req.attempt,
                mac=lease["mac"],
                ip=lease["ip"],
                expires_at=lease["expires_at"],
            )

        await self._answer(incoming, "net.leased", leased())

    async def forward(self, incoming: Incoming[NetForward]) -> None:
        req = incoming.payload

        async def forwarded() -> NetForwarded:
            lease, external = await self.gateway.forward(req)
            return NetForwarded(
                job_id=req.job_id,
                attempt=req.attempt,
                name=req.name,
                guest=f"{lease['ip']}:{req.port}",
                external=external,
            )

        await self._answer(incoming, "net.forwarded", forwarded())

    async def release(self, incoming: Incoming[NetRelease]) -> None:
        req = incoming.payload
        released = self.gateway.release_attempt(req.job_id, req.attempt, req.reason)
        await self._answer(incoming, "net.released", released)

    async def _answer(
        self, incoming: Incoming[Request], type_: str, outcome: Awaitable[Payload]
    ) -> None:
        """Answer with `type_` and what `outcome` gives, or with `net.failed` if the
        gateway refused."""
        try:
            payload = await outcome
        except Refused as refused:
            log.info("request_failed", request=incoming.envelope.type, reason=str(refused))
            type_, payload = (
                "net.failed",
                NetFailed(
                    job_id=incoming.payload.job_id,
                    attempt=incoming.payload.attempt,
                    request=incoming.envelope.type,
                    reason=str(refused),
                    retryable=refused.retryable,
                ),
            )
        envelope = self.bus.envelope(
            type_,
            payload,
            **incoming.envelope.caused(correlation_id=incoming.payload.job_id, actor="netgw"),
        )
        # The reply and the record go out together (the reply first: a node waits on it).
        await asyncio.gather(self.bus.reply(incoming, envelope), self.bus.publish(envelope))


REQUESTS = HandlerTable(
    topology.NETGW_REQUESTS,
    (
        on("net.lease", NetLease, RequestHandlers.lease),
        on("net.forward", NetForward, RequestHandlers.forward),
        on("net.release", NetRelease, RequestHandlers.release),
    ),
)
