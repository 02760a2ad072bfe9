"""The node's side of the network gateway: lease, forward and release, over RabbitMQ.

Requests are idempotent per attempt, so every call simply asks again when netgw does
not answer in time (it may be restarting); only a refusal that asking again cannot
change, or the job's deadline, ends the asking.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import structlog

from shared.bus import Bus, NoReply
from shared.envelope import utcnow
from shared.messages.base import Payload
from shared.messages.net import (
    NetFailed,
    NetForward,
    NetForwarded,
    NetLease,
    NetLeased,
    NetRelease,
)

log = structlog.get_logger("medhive.vmnode.guestnet")

#: How long netgw may wait for a booting guest within one `net.forward`.
FORWARD_WAIT_S = 10.0


class NetworkRefused(Exception):
    """netgw refused a request (pool exhausted, no lease, ...); the reason says why."""


class GuestNetwork:
    """Leases and forwards for this node's VMs."""

    def __init__(self, bus: Bus, node_id: str, timeout_s: float = 30.0) -> None:
        self.bus = bus
        self.node_id = node_id
        self.timeout_s = timeout_s

    async def lease(
        self, job_id: str, attempt: int, tenant: str, until: datetime
    ) -> tuple[str, str]:
        """The attempt's (mac, ip); raises `NetworkRefused` or `NoReply`."""
        request = NetLease(job_id=job_id, attempt=attempt, node_id=self.node_id, expires_at=until)
        reply = await self._ask("net.lease", request, job_id, tenant)
        if not isinstance(reply, NetLeased):
            raise NetworkRefused(f"no network address for the guest: {_reason(reply)}")
        return reply.mac, reply.ip

    async def forward(
        self, job_id: str, attempt: int, tenant: str, name: str, port: int, until: datetime
    ) -> str:
        """Ask until the guest answers on `port` and is forwarded; returns host:port."""
        while True:
            request = NetForward(
                job_id=job_id, attempt=attempt, name=name, port=port, wait_s=FORWARD_WAIT_S
            )
            try:
                reply = await self._ask("net.forward", request, job_id, tenant, FORWARD_WAIT_S)
            except NoReply:
                reply = None
            if isinstance(reply, NetForwarded):
                return reply.external
            if reply is not None and not (isinstance(reply, NetFailed) and reply.retryable):
                raise NetworkRefused(_reason(reply))
            if utcnow() >= until:
                raise NetworkRefused(f"the guest never answered on port {port} ({name})")
            await asyncio.sleep(1.0)  # netgw restarting or the pool full: ask again soon

    async def release(self, job_id: str, attempt: int, tenant: str, reason: str) -> None:
        """Free the attempt's lease and forwards (nothing held is not an error)."""
        request = NetRelease(job_id=job_id, attempt=attempt, reason=reason[:500])
        await self._ask("net.release", request, job_id, tenant)

    async def _ask(
        self, type_: str, request: Payload, job_id: str, tenant: str, extra_s: float = 0.0
    ) -> Payload:
        """One request; the job's tenant travels in the envelope, so the answers (and
        their audit records) are the tenant's to see."""
        return await self.bus.request(
            type_,
            request,
            timeout_s=self.timeout_s + extra_s,
            correlation_id=job_id,
            tenant=tenant,
            actor=self.node_id,
        )


def _reason(reply: Payload) -> str:
    """Why netgw did not do what was asked (a `net.failed`, or an unexpected answer)."""
    if isinstance(reply, NetFailed):
        return reply.reason
    return f"netgw answered with {type(reply).__name__}"
