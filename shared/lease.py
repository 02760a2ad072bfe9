"""A leader lease in MongoDB: of several instances of a service, the one holding it acts.

Two schedulers run so that losing one host does not stop dispatch, but placement, the
walltime watchdog and the outbox sweep keep their view in memory and must act once
(each job placed once, each deadline enforced once). So the instances are active and
standby: the one that holds the lease document does the work; the others wait for it
to expire and take it.

- **Holding.** The holder writes `expires_at = now + ttl` every `ttl / 3`. A standby
  tries every `ttl / 4` and gets the lease only when it has expired (or names it).
- **Handing over.** A graceful stop deletes the lease, so a standby takes it at its
  next try; a holder killed outright is replaced `ttl` after its last renewal.
- **Losing it.** A holder that finds the lease in another's name stops acting at once
  (`on_lost`; the scheduler exits and its supervisor starts it again, as a standby).
  A holder that cannot reach the database goes on: it cannot write either, and every
  job change is guarded by the job's revision, so a decision taken on a stale view is
  refused by the store, not applied twice.
- **Names.** The holder's name is stable across restarts of one instance (the host's
  name by default), so a restarted instance takes its own lease back at once instead
  of waiting `ttl`. Two instances must not share a name.
- **Clocks.** Expiry is judged by the instances' clocks: hosts keep NTP time, with a
  skew well under `ttl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import structlog
from aiohttp import web
from pydantic import Field
from pydantic_settings import BaseSettings
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError, PyMongoError

from shared.envelope import utcnow
from shared.mongo import Document
from shared.service import MONGO
from shared.settings import default_host

log = structlog.get_logger("medhive.lease")

#: The collection of a service's leases, in its own database.
LEASES = "leases"
#: The exit status of an instance that found its lease taken by another.
LEASE_LOST_EXIT = 75


class LeaderSettings(BaseSettings):
    """The settings of a service of which one instance acts and the others stand by
    (with the service's own prefix: `MEDHIVE_SCHEDULER_INSTANCE`...)."""

    instance: str = Field(
        default_factory=default_host,
        description="This instance's name among several (README, High availability): the "
        "one holding the lease acts, the others stand by. Stable across restarts; unique.",
    )
    lease_s: float = Field(
        10.0,
        gt=0,
        description="How long after the active instance's last sign of life a "
        "standby one takes over.",
    )


def leadership(
    service: str, database: str, settings: LeaderSettings
) -> Callable[[web.Application], AsyncIterator[None]]:
    """An app's cleanup context that holds the service's lease while the app runs. Put
    it before everything that acts: a standby waits in it, with nothing started (its
    HTTP API included, so a load balancer's health check sends clients to the active
    instance, and a standby on the same host can take over the same port)."""

    async def hold(app: web.Application) -> AsyncIterator[None]:
        lease = Lease(
            app[MONGO][database][LEASES], service, settings.instance, settings.lease_s,
            on_lost=stop_acting,
        )  # fmt: skip
        await lease.acquire()
        yield
        await lease.release()

    return hold


def stop_acting() -> None:
    """Another instance holds the lease: this one must not act a moment longer. It
    exits at once; its supervisor starts it again, as a standby."""
    sys.stdout.flush()
    os._exit(LEASE_LOST_EXIT)


class Lease:
    def __init__(
        self,
        collection: AsyncCollection[Document],
        name: str,
        holder: str,
        ttl_s: float,
        on_lost: Callable[[], None],
    ) -> None:
        self.collection = collection
        self.name = name
        self.holder = holder
        self.ttl = timedelta(seconds=ttl_s)
        self.on_lost = on_lost
        self._renewer: asyncio.Task[None] | None = None

    async def acquire(self) -> None:
        """Wait until this instance holds the lease, then keep it renewed."""
        waiting = False
        while not await self._take():
            if not waiting:
                log.info("lease_standby", lease=self.name, holder=self.holder)
                waiting = True
            await asyncio.sleep(self.ttl.total_seconds() / 4)  # no change stream to wait on
        log.info("lease_held", lease=self.name, holder=self.holder)
        self._renewer = asyncio.create_task(self._renew(), name=f"lease-{self.name}")

    async def release(self) -> None:
        """Stop renewing and hand the lease over at once."""
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        with contextlib.suppress(PyMongoError):  # else it expires by itself
            await self.collection.delete_one({"_id": self.name, "holder": self.holder})

    async def _take(self) -> bool:
        """Take or renew the lease if it is free, expired or already ours."""
        now = utcnow()
        try:
            await self.collection.update_one(
                {"_id": self.name, "$or": [{"holder": self.holder}, {"expires_at": {"$lte": now}}]},
                {"$set": {"holder": self.holder, "expires_at": now + self.ttl, "renewed_at": now}},
                upsert=True,
            )
        except DuplicateKeyError:  # held by another: the upsert met its document
            return False
        return True

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl.total_seconds() / 3)
            try:
                held = await self._take()
            except PyMongoError as exc:
                log.warning("lease_renewal_failed", lease=self.name, error=repr(exc)[:200])
                continue
            if not held:
                log.error("lease_lost", lease=self.name, holder=self.holder)
                self.on_lost()
                return
