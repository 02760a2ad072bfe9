"""The gateway: leases, forwards and releases, with the data plane (dnsmasq's bindings,
nftables' forwards) kept equal to its store. The requests that ask for them arrive
through `handlers.py`.

A new lease is bound in dnsmasq's hosts file and stored; a new forward is stored while
the guest is probed, and its rule goes in once the guest answers. Either is answered
only once it is both stored and in place. A netgw killed in between, or in the middle
of a release, finds on its next start a data plane and a store that disagree, and
`reconcile` makes the data plane match the store: what no stored lease names is
removed, what is missing is restored. Nothing live is lost and nothing stale stays
open. Leases expire with their job (plus a grace period): the sweeper releases what
outlived its job, say because the node that held it died.

"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import structlog

from services.netgw.dhcp import Dhcp
from services.netgw.documents import ForwardDoc, LeaseDoc
from services.netgw.firewall import Firewall, Rule
from services.netgw.netns import Namespace
from services.netgw.settings import NetgwSettings
from services.netgw.store import NetStore, PoolExhausted, lease_id
from shared.bus import Bus
from shared.envelope import utcnow
from shared.messages.net import NetForward, NetLease, NetReleased
from shared.tasks import PeriodicLoop

log = structlog.get_logger("medhive.netgw")


class Refused(Exception):
    """A request the gateway cannot meet now; `retryable`: asking again may succeed."""

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.retryable = retryable


def _rule(forward: ForwardDoc) -> Rule:
    return Rule(
        forward["_id"], forward["external_port"], forward["guest_ip"], forward["guest_port"]
    )


class Gateway:
    """Leases, forwards and releases; start-up reconciliation and the sweep."""

    def __init__(
        self,
        bus: Bus,
        store: NetStore,
        settings: NetgwSettings,
        namespace: Namespace,
        firewall: Firewall,
        dhcp: Dhcp,
    ) -> None:
        self.bus = bus
        self.store = store
        self.settings = settings
        self.ns = namespace
        self.firewall = firewall
        self.dhcp = dhcp

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Sweep what expired while netgw was down, then make the data plane match."""
        await self.sweep()
        leases = self.store.live_leases()
        forwards = self.store.live_forwards()
        await self.firewall.reconcile([_rule(f) for f in forwards])
        await self.dhcp.start((lease["mac"], lease["ip"]) for lease in leases)

    async def stop(self) -> None:
        await self.dhcp.stop()

    # -- leases and forwards --------------------------------------------------------

    async def lease(self, req: NetLease, tenant: str | None) -> LeaseDoc:
        """The attempt's lease, claimed, bound and stored if it is new."""
        expires_at = req.expires_at + timedelta(seconds=self.settings.lease_grace_s)
        try:
            lease, created = self.store.claim_lease(
                req.job_id, req.attempt, req.node_id, tenant, expires_at
            )
        except PoolExhausted as exc:
            raise Refused(str(exc), retryable=True) from exc
        if created:
            lease = await self._store_lease(lease)
            log.info("leased", mac=lease["mac"], ip=lease["ip"])
        return lease

    async def forward(self, req: NetForward) -> tuple[LeaseDoc, str]:
        """Forward a port of the attempt's guest once it answers; returns the lease and
        the external address (host:port)."""
        lease = self.store.get_lease(req.job_id, req.attempt)
        if lease is None:
            why = f"attempt {req.attempt} of job {req.job_id} holds no lease"
            raise Refused(why, retryable=False)
        try:
            claim, created = self.store.claim_forward(lease, req.name, req.port)
        except PoolExhausted as exc:
            raise Refused(str(exc), retryable=True) from exc
        forward = await self._open(claim, created, lease, req.port, req.wait_s)
        if forward is None:
            why = f"the guest does not answer on {lease['ip']}:{req.port} yet"
            raise Refused(why, retryable=True)
        if self.store.get_lease(req.job_id, req.attempt) is not lease:
            # Swept while the guest was probed: the forward goes with its lease.
            await self.firewall.remove(forward["_id"])
            await self.store.drop_forward(forward)
            why = f"the lease of attempt {req.attempt} of job {req.job_id} was released"
            raise Refused(why, retryable=False)
        external = f"{self.settings.external_address}:{forward['external_port']}"
        if forward is claim and created:
            log.info("forwarded", name=forward["name"], external=external)
        return lease, external

    async def release_attempt(self, job_id: str, attempt: int, reason: str) -> NetReleased:
        """Release the attempt's lease and forwards; holding none is no error."""
        lease = self.store.get_lease(job_id, attempt)
        if lease is None:
            return NetReleased(job_id=job_id, attempt=attempt, reason=reason)
        return await self.release(lease, reason)

    async def _store_lease(self, claim: LeaseDoc) -> LeaseDoc:
        """Bind a claimed lease in dnsmasq and store it; returns the lease as stored.

        Bound first: a leased guest may ask for its address as soon as it is answered,
        and the hosts file costs far less than the insert. If the insert fails, the
        claim is withdrawn and unbound, and the request is retried. If the store held
        the same request's lease already (a redelivery handled twice), that one is
        bound instead.
        """
        self._rebind()
        try:
            stored = await self.store.save_lease(claim)
        except BaseException:
            self.store.withdraw(claim)
            self._rebind()
            raise
        if stored is not claim:
            self._rebind()
        return stored

    async def _open(
        self, claim: ForwardDoc, created: bool, lease: LeaseDoc, port: int, wait_s: float
    ) -> ForwardDoc | None:
        """Probe the guest, then put the forward's rule in place; returns the forward as
        stored, or None if the guest did not answer within `wait_s`.

        A new forward is stored meanwhile: the probe and the rule cost about what the
        insert does, so the answer waits for the slower of the two only. The rule goes
        in only once the guest answers, so it never points at a port that is shut, and
        a repeated request adds it only if it is missing, so no rule is ever doubled.
        If storing fails, the rule comes out, the claim is withdrawn and the request is
        retried. A new forward whose guest did not answer is dropped again.
        """

        async def probe_then_open() -> bool:
            if not await self._answers(lease["ip"], port, wait_s):
                return False
            await self.firewall.add(_rule(claim), new=created)
            return True

        if not created:
            return claim if await probe_then_open() else None
        stored, opened = await asyncio.gather(
            self.store.save_forward(claim), probe_then_open(), return_exceptions=True
        )
        if stored is claim and opened is True:
            return claim
        if opened is True:  # the rule is in for a claim that was not stored
            await self.firewall.remove(claim["_id"])
        if isinstance(stored, BaseException):
            self.store.withdraw(claim)
            raise stored
        if stored is claim:  # the guest did not answer (or the probe failed)
            await self.store.drop_forward(claim)
        if isinstance(opened, BaseException):
            raise opened
        if opened is not True:
            return None
        # The same request's forward was stored already (a redelivery handled twice).
        assert isinstance(stored, dict)
        await self.firewall.add(_rule(stored), new=False)
        return stored

    # -- releasing ------------------------------------------------------------------

    async def release(self, lease: LeaseDoc, reason: str) -> NetReleased:
        """Remove the lease's forwards from the data plane, then the lease from the store."""
        forwards = self.store.forwards_of(lease)
        for forward in forwards:
            await self.firewall.remove(forward["_id"])
            await self._forget_connections(forward["external_port"])
        await self.store.drop_lease(lease)
        self._rebind()
        log.info("released", job_id=lease["job_id"], ip=lease["ip"], reason=reason)
        return NetReleased(
            job_id=lease["job_id"],
            attempt=lease["attempt"],
            mac=lease["mac"],
            ip=lease["ip"],
            forwards=[f"{self.settings.external_address}:{f['external_port']}" for f in forwards],
            reason=reason,
        )

    async def sweep(self) -> int:
        """Release every lease that outlived its job; announce each release."""
        expired = self.store.expired_leases(utcnow())
        for lease in expired:
            released = await self.release(lease, "the lease expired with its job")
            await self.bus.emit(
                "net.released",
                released,
                correlation_id=lease["job_id"],
                tenant=lease.get("tenant"),
                actor="netgw",
            )
        return len(expired)

    # -- helpers --------------------------------------------------------------------

    async def _answers(self, ip: str, port: int, wait_s: float) -> bool:
        """Whether the guest accepts a TCP connection within `wait_s` (checked at once)."""
        give_up = time.monotonic() + wait_s
        while True:
            left = give_up - time.monotonic()
            if await self.ns.reachable(ip, port, max(min(left, 1.0), 0.2)):
                return True
            if time.monotonic() + self.settings.probe_interval_s > give_up:
                return False
            await asyncio.sleep(self.settings.probe_interval_s)  # the guest is still booting

    def _rebind(self) -> None:
        """Write every live lease to dnsmasq's hosts file."""
        self.dhcp.bind((lease["mac"], lease["ip"]) for lease in self.store.live_leases())

    async def _forget_connections(self, external_port: int) -> None:
        """Drop tracked connections through a removed forward, so none lives on."""
        argv = self.ns.command(
            "conntrack",
            "-D",
            "-p",
            "tcp",
            "--orig-dst",
            str(self.settings.external_address),
            "--orig-port-dst",
            str(external_port),
        )
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
            )
            await process.wait()  # exit 1 means no such connection: nothing to do
        except FileNotFoundError:
            log.warning("conntrack_missing", why="established connections outlive the forward")


class Sweeper(PeriodicLoop):
    """Releases expired leases every `sweep_s`."""

    task_name = "netgw-sweeper"

    def __init__(self, gateway: Gateway, period_s: float) -> None:
        super().__init__(period_s)
        self.gateway = gateway

    async def tick(self) -> None:
        await self.gateway.sweep()


__all__ = ["Gateway", "Refused", "Sweeper", "lease_id"]
