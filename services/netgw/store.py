"""Leases and forwards in MongoDB: the gateway's record, and the truth it reconciles to.

A lease takes one slot of the pool; slot i is both the i-th MAC and the i-th IP, and a
unique index on the slot means two leases can never share one, whatever this process
believes. A forward's external port is unique the same way. Slots and ports are
handed out round-robin, so an address freed a moment ago (still in a guest's ARP
cache or dnsmasq's lease file) is the last to be used again.

One netgw owns one gateway (its dnsmasq, its nftables table), so the store keeps what
it wrote in memory as well, and reads are answered from memory. A new lease or forward
is claimed in memory first, so that requests handled meanwhile pass its slot by, then
stored; the gateway binds the lease or probes the guest while the insert is in flight. A request
then costs one database write, which keeps a lease and a forward within a few
milliseconds. The documents' shapes are in `documents.py`.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import TypeVar, cast

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.netgw.documents import ForwardDoc, LeaseDoc
from services.netgw.settings import NetgwSettings
from shared.envelope import utcnow
from shared.mongo import Document

#: A lease or a forward: what `_save` stores either of.
_Claim = TypeVar("_Claim", LeaseDoc, ForwardDoc)


class PoolExhausted(Exception):
    """Every address or port of a pool is in use."""


class SlotTaken(Exception):
    """The slot or port of a claim is stored for another lease or forward."""


def _next_free(start: int, size: int, used: set[int]) -> int | None:
    """The first of 0..size-1 not in `used`, going round from `start`."""
    for offset in range(size):
        if (candidate := (start + offset) % size) not in used:
            return candidate
    return None


def lease_id(job_id: str, attempt: int) -> str:
    return f"{job_id}:{attempt}"


def forward_id(job_id: str, attempt: int, name: str) -> str:
    return f"medhive:{job_id}:{attempt}:{name}"


class NetStore:
    """The `leases` and `forwards` collections, and the pools they draw from."""

    def __init__(self, db: AsyncDatabase[Document], settings: NetgwSettings) -> None:
        # pymongo returns the stored dicts as they are; these collections hold only
        # what this class writes, so their documents are typed as written, here once.
        self.leases = cast("AsyncCollection[LeaseDoc]", db["leases"])
        self.forwards = cast("AsyncCollection[ForwardDoc]", db["forwards"])
        self.settings = settings
        self._leases: dict[str, LeaseDoc] = {}
        self._forwards: dict[str, ForwardDoc] = {}
        self._next_slot = 0
        self._next_port = 0

    async def load(self) -> None:
        """Create the indexes and read what the store holds (at start)."""
        await self.leases.create_index([("slot", ASCENDING)], unique=True)
        await self.leases.create_index([("expires_at", ASCENDING)])
        await self.forwards.create_index([("external_port", ASCENDING)], unique=True)
        await self.forwards.create_index([("lease_id", ASCENDING)])
        self._leases = {doc["_id"]: doc async for doc in self.leases.find({})}
        self._forwards = {doc["_id"]: doc async for doc in self.forwards.find({})}
        newest = max(self._leases.values(), key=lambda d: d["created_at"], default=None)
        self._next_slot = newest["slot"] + 1 if newest else 0

    # -- pools --------------------------------------------------------------------

    def address(self, slot: int) -> tuple[str, str]:
        """The MAC and IP of pool slot `slot`."""
        first, _ = self.settings.ip_range
        ip = ipaddress.IPv4Address(int(first) + slot)
        tail = slot.to_bytes(3, "big")
        mac = self.settings.mac_prefix + "".join(f":{b:02x}" for b in tail)
        return mac, str(ip)

    # -- leases -------------------------------------------------------------------

    def claim_lease(
        self, job_id: str, attempt: int, node_id: str, tenant: str | None, expires_at: datetime
    ) -> tuple[LeaseDoc, bool]:
        """The attempt's lease, or a new one on the next free slot; and whether it is new.

        A new lease is held in memory at once, so that requests handled meanwhile pass
        its slot by, and is not stored yet: `save_lease` stores it, `withdraw` gives
        the slot back.
        """
        key = lease_id(job_id, attempt)
        if (existing := self._leases.get(key)) is not None:
            return existing, False
        size = self.settings.pool_size
        slot = _next_free(self._next_slot, size, {doc["slot"] for doc in self._leases.values()})
        if slot is None:
            raise PoolExhausted(f"all {size} guest addresses are leased")
        mac, ip = self.address(slot)
        # As stored: MongoDB keeps milliseconds, so a repeated answer is the same answer.
        expires_at = expires_at.replace(microsecond=expires_at.microsecond // 1000 * 1000)
        doc: LeaseDoc = {
            "_id": key, "job_id": job_id, "attempt": attempt, "node_id": node_id,
            "tenant": tenant, "slot": slot, "mac": mac, "ip": ip,
            "expires_at": expires_at, "created_at": utcnow(),
        }  # fmt: skip
        self._leases[key] = doc
        self._next_slot = slot + 1
        return doc, True

    async def save_lease(self, lease: LeaseDoc) -> LeaseDoc:
        """Store a claimed lease; returns the lease as stored.

        That is another one when the same request was stored already (a redelivery
        handled twice): the claim is replaced by it. `SlotTaken` when the slot is held
        behind this process's back: withdraw the claim and claim again.
        """
        return await self._save(self.leases, self._leases, lease)

    def withdraw(self, claim: LeaseDoc | ForwardDoc) -> None:
        """Give back a claimed lease or forward that could not be stored."""
        kept: dict[str, LeaseDoc] | dict[str, ForwardDoc]
        for kept in (self._leases, self._forwards):
            if kept.get(claim["_id"]) is claim:
                del kept[claim["_id"]]

    async def _save(
        self, collection: AsyncCollection[_Claim], kept: dict[str, _Claim], claim: _Claim
    ) -> _Claim:
        try:
            await collection.insert_one(claim)
        except DuplicateKeyError:
            if (existing := await collection.find_one({"_id": claim["_id"]})) is None:
                raise SlotTaken(claim["_id"]) from None
            kept[claim["_id"]] = existing
            return existing
        return claim

    def get_lease(self, job_id: str, attempt: int) -> LeaseDoc | None:
        return self._leases.get(lease_id(job_id, attempt))

    def live_leases(self) -> list[LeaseDoc]:
        return list(self._leases.values())

    def expired_leases(self, now: datetime) -> list[LeaseDoc]:
        return [doc for doc in self._leases.values() if doc["expires_at"] < now]

    async def drop_lease(self, lease: LeaseDoc) -> None:
        await self.forwards.delete_many({"lease_id": lease["_id"]})
        await self.leases.delete_one({"_id": lease["_id"]})
        for forward in self.forwards_of(lease):
            del self._forwards[forward["_id"]]
        self._leases.pop(lease["_id"], None)

    # -- forwards -----------------------------------------------------------------

    def claim_forward(self, lease: LeaseDoc, name: str, guest_port: int) -> tuple[ForwardDoc, bool]:
        """The lease's forward called `name`, or a new one on the next free port; and
        whether it is new. Held in memory like a claimed lease, until `save_forward`."""
        key = forward_id(lease["job_id"], lease["attempt"], name)
        if (existing := self._forwards.get(key)) is not None:
            return existing, False
        low, high = self.settings.external_ports
        size = high - low + 1
        used = {doc["external_port"] - low for doc in self._forwards.values()}
        offset = _next_free(self._next_port, size, used)
        if offset is None:
            raise PoolExhausted(f"all {size} external ports are forwarded")
        doc: ForwardDoc = {
            "_id": key, "lease_id": lease["_id"], "job_id": lease["job_id"],
            "attempt": lease["attempt"], "name": name, "external_port": low + offset,
            "guest_ip": lease["ip"], "guest_port": guest_port,
            "expires_at": lease["expires_at"],
        }  # fmt: skip
        self._forwards[key] = doc
        self._next_port = offset + 1
        return doc, True

    async def save_forward(self, forward: ForwardDoc) -> ForwardDoc:
        """Store a claimed forward; as `save_lease`."""
        return await self._save(self.forwards, self._forwards, forward)

    async def drop_forward(self, forward: ForwardDoc) -> None:
        """Forget a forward that was never answered (its guest did not answer)."""
        self._forwards.pop(forward["_id"], None)
        await self.forwards.delete_one({"_id": forward["_id"]})

    def forwards_of(self, lease: LeaseDoc) -> list[ForwardDoc]:
        return [doc for doc in self._forwards.values() if doc["lease_id"] == lease["_id"]]

    def live_forwards(self) -> list[ForwardDoc]:
        return list(self._forwards.values())
