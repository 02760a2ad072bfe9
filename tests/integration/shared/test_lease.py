"""The leader lease on the real database server: one holder at a time, a hand-over at
a graceful stop, a take-over after expiry, and a holder that finds the lease taken is
told at once."""

from __future__ import annotations

import asyncio

from pymongo.asynchronous.database import AsyncDatabase

from shared.lease import Lease
from shared.mongo import Document
from tests.helpers import lease_renewed

TTL_S = 0.6


def lease(database: AsyncDatabase[Document], holder: str, lost: asyncio.Event) -> Lease:
    return Lease(database["leases"], "scheduler", holder, TTL_S, on_lost=lost.set)


async def test_a_standby_waits_while_the_lease_is_held_and_takes_it_when_handed_over(
    database: AsyncDatabase[Document],
) -> None:
    active, standby = lease(database, "a", asyncio.Event()), lease(database, "b", asyncio.Event())
    await active.acquire()
    waiting = asyncio.create_task(standby.acquire())
    await lease_renewed(database["leases"], "scheduler", times=2)
    assert not waiting.done()  # the standby tried all along, and waits
    await active.release()
    await asyncio.wait_for(waiting, 2 * TTL_S)  # at its next try, not after the expiry
    assert (await database["leases"].find_one({"_id": "scheduler"}) or {})["holder"] == "b"
    await standby.release()


async def test_an_expired_lease_is_taken_and_its_old_holder_learns_it_at_its_renewal(
    database: AsyncDatabase[Document],
) -> None:
    lost = asyncio.Event()
    old, new = lease(database, "a", lost), lease(database, "b", asyncio.Event())
    await old.acquire()
    # The holder stops renewing (a paused process) until its lease has expired...
    assert old._renewer is not None
    old._renewer.cancel()
    await new.acquire()  # ...so another takes it
    # ...then comes back: its first renewal finds the lease in another's name.
    old._renewer = asyncio.create_task(old._renew())
    await asyncio.wait_for(lost.wait(), 2 * TTL_S)
    await new.release()


async def test_an_instance_restarted_under_its_name_takes_its_own_lease_back_at_once(
    database: AsyncDatabase[Document],
) -> None:
    first = lease(database, "a", asyncio.Event())
    await first.acquire()
    assert first._renewer is not None
    first._renewer.cancel()  # killed: no release, the lease is still in its name
    again = lease(database, "a", asyncio.Event())
    await asyncio.wait_for(again.acquire(), TTL_S / 2)  # before it could have expired
    await again.release()
