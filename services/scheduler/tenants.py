"""Tenants' shares, quotas and decayed usage: what fair share and quotas decide from.

A job that holds `cpus` and `memory_mb` on a node costs, per second it holds them,

    rate = max(cpus, memory_mb / memory_mb_per_cpu)        (cpu-equivalents)

the larger of its two resources, counted in cpus (a job that takes a node's memory
keeps others off it as surely as one that takes its cpus). When it lets go, its
tenant's usage grows by `rate x seconds held`, and usage decays with a half-life h:

    U(now) = U(then) x 2^(-(now - then) / h) + what ended since

Placement goes to the tenant with the lowest

    load = (held + U x ln2 / h) / share

`held` is the rate of the jobs that hold room now, and `U x ln2 / h` the rate its
decayed usage amounts to (a tenant that has run at rate r for long has U = r x h / ln2):
so both count, the present at once and the past fading. Within a tenant, jobs go by
priority, then age.

Kept in the scheduler's `tenants` collection: a share or a quota when an operator sets
it, usage every `FLUSH_S` (one write for every tenant that used anything). A crash loses
at most that much accounting, never a job.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

import structlog
from pydantic import Field
from pymongo import UpdateOne
from pymongo.asynchronous.database import AsyncDatabase

from services.scheduler.documents import TenantDocument
from shared.envelope import utcnow
from shared.messages.base import Payload
from shared.mongo import Document
from shared.tasks import PeriodicLoop

log = structlog.get_logger("medhive.scheduler.tenants")

#: How often decayed usage is written back.
FLUSH_S = 5.0


class Quota(Payload):
    """Limits of one tenant; an unset limit is no limit."""

    max_running_cpus: float | None = Field(None, gt=0, description="Cpus its placed jobs hold.")
    max_running_memory_mb: int | None = Field(None, gt=0, description="Memory they hold.")
    max_running_jobs: int | None = Field(None, gt=0, description="Jobs placed at once.")
    max_queued_jobs: int | None = Field(
        None, gt=0, description="Jobs waiting to be placed; a submit past it is refused."
    )


class TenantPolicy(Payload):
    """What an operator sets for a tenant (`PUT /v1/tenants/{tenant}`)."""

    share: float = Field(1.0, gt=0, le=1_000_000, description="Weight in fair share.")
    quota: Quota = Field(default_factory=Quota)


@dataclass
class Usage:
    """Decayed resource-time (cpu-equivalent seconds) as of `at`."""

    value: float = 0.0
    at: datetime = field(default_factory=utcnow)

    def decayed(self, now: datetime, half_life_s: float) -> float:
        elapsed = max(0.0, (now - self.at).total_seconds())
        return self.value * float(2.0 ** (-elapsed / half_life_s))


class TenantBook(PeriodicLoop):
    """Every tenant's policy and usage, in memory, written back to the store."""

    task_name = "tenant-usage"

    def __init__(
        self, db: AsyncDatabase[Document], half_life_s: float, memory_mb_per_cpu: int
    ) -> None:
        super().__init__(FLUSH_S)
        self.collection = db["tenants"]
        self.half_life_s = half_life_s
        self.memory_mb_per_cpu = memory_mb_per_cpu
        self.policies: dict[str, TenantPolicy] = {}
        self.usage: dict[str, Usage] = {}
        self._dirty: set[str] = set()

    async def load(self) -> None:
        async for found in self.collection.find({}):
            doc = cast(TenantDocument, found)  # what pymongo reads is untyped
            if "policy" in doc:
                self.policies[doc["_id"]] = TenantPolicy.model_validate(doc["policy"])
            if "usage" in doc:
                self.usage[doc["_id"]] = Usage(doc["usage"], doc["usage_at"])

    def policy(self, tenant: str) -> TenantPolicy:
        return self.policies.get(tenant) or TenantPolicy()

    async def set_policy(self, tenant: str, policy: TenantPolicy) -> None:
        """Stored first, then in effect: a restart keeps what was answered."""
        await self.collection.update_one(
            {"_id": tenant}, {"$set": {"policy": policy.model_dump(mode="json")}}, upsert=True
        )
        self.policies[tenant] = policy

    def rate(self, cpus: float, memory_mb: int) -> float:
        """Cpu-equivalents a job holding this much costs per second."""
        return max(cpus, memory_mb / self.memory_mb_per_cpu)

    def charge(self, tenant: str, rate: float, seconds: float, now: datetime) -> None:
        """A job of `tenant` let go of room it held for `seconds`."""
        usage = self.usage.get(tenant) or Usage(at=now)
        self.usage[tenant] = Usage(usage.decayed(now, self.half_life_s) + rate * seconds, now)
        self._dirty.add(tenant)

    def used(self, tenant: str, now: datetime) -> float:
        """Decayed usage now, cpu-equivalent seconds."""
        usage = self.usage.get(tenant)
        return usage.decayed(now, self.half_life_s) if usage else 0.0

    def load_of(self, tenant: str, held: float, now: datetime) -> float:
        """The fair-share load (module docstring): lower goes first."""
        past = self.used(tenant, now) * math.log(2) / self.half_life_s
        return (held + past) / self.policy(tenant).share

    async def flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        if not dirty:
            return
        writes = [
            UpdateOne(
                {"_id": tenant},
                {"$set": {"usage": self.usage[tenant].value, "usage_at": self.usage[tenant].at}},
                upsert=True,
            )
            for tenant in sorted(dirty)
        ]
        try:
            await self.collection.bulk_write(writes, ordered=False)
        except BaseException:
            self._dirty |= dirty  # written next time
            raise

    async def tick(self) -> None:
        await self.flush()

    async def stop(self) -> None:
        await super().stop()
        await self.flush()


class QueueFull(Exception):
    """A submit past the tenant's queued-jobs quota; the message says so to the sender."""


class Admission:
    """The queued-jobs quota, without overshoot under concurrent submissions: a submit
    counts as waiting from its check on (all of it runs on one event loop, and the
    check and the count happen with no wait between them), so two submits cannot both
    take the last place."""

    def __init__(self, book: TenantBook, unplaced: Callable[[str], int]) -> None:
        self.book = book
        self.unplaced = unplaced
        self._pending: Counter[str] = Counter()

    @contextmanager
    def ticket(self, tenant: str) -> Iterator[None]:
        limit = self.book.policy(tenant).quota.max_queued_jobs
        waiting = self.unplaced(tenant) + self._pending[tenant]
        if limit is not None and waiting >= limit:
            raise QueueFull(
                f"tenant {tenant!r} has {waiting} jobs waiting to be placed and may have at "
                f"most {limit}: submit again once some have started"
            )
        self._pending[tenant] += 1
        try:
            yield
        finally:
            self._pending[tenant] -= 1
