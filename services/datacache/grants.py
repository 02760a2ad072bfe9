"""Grants: which node may read which objects for which job, and until when.

The scheduler asks for a grant when it places a job (`data.grant`) and releases it
when the job ends (`data.release`). No secret travels on the bus: a node proves who it
is with its own token (role `node`, named after the node), and the grant is the
record that lets that node read that job's objects until the job's walltime ends.
Every refusal says why, so an operator reading `data.denied` can tell an expired grant
from a node reading another job's data.

A node may hand its access to one grant to a task it runs on another host (a Swarm
node's stager and uploader, see `services/vmnode/runtimes/swarm.py`): `delegate` issues
a token that stands for that node on that one grant only, and dies with the grant
(revoked when the job ends or a new attempt supersedes it, expired with its
deadlines). Only its digest is stored, in the grant; it cannot issue tokens itself.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime

import structlog

from services.datacache.documents import Deadline, GrantDoc, ObjectDoc
from services.datacache.store import LOOKUP_CHUNK, CacheStore
from shared.auth import DELEGATED_PREFIX, Principal, Role, token_digest
from shared.bus import Bus
from shared.consume import Rejected
from shared.envelope import Envelope, utcnow
from shared.messages.data import DataFailed, DataGrant, DataGranted, DataRelease, DataReleased

log = structlog.get_logger("medhive.datacache.grants")


class Denied(Exception):
    """An access refused; `status` is the HTTP status the caller gets."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Access:
    """A checked access: the grant that allows it, and the object it is to, if one."""

    grant: GrantDoc
    node_id: str
    object: ObjectDoc | None = None


#: Seconds a grant looked up for a node's read is used again for its next reads. Grants
#: change only through this service (a new attempt's grant, a release), which forgets
#: the job's grants at once; the bound is for datacaches sharing one store.
GRANT_REUSE_S = 2.0
#: Objects of a grant looked up in one query when a read finds one not at hand: the one
#: read and those after it in the grant, which is the order a node fetches them in.
OBJECTS_AT_ONCE = LOOKUP_CHUNK


class GrantService:
    def __init__(self, store: CacheStore, bus: Bus) -> None:
        self.store = store
        self.bus = bus
        #: (job, node, deadline field) -> (reusable until, grant): a node reading a
        #: study asks once per instance, thousands of times in a few seconds.
        self._recent: dict[tuple[str, str, Deadline], tuple[float, GrantDoc]] = {}
        #: Grant id -> (reusable until, its objects looked up so far), for the same
        #: reads: a query for each instance was the largest part of serving a study.
        self._objects: dict[str, tuple[float, dict[str, ObjectDoc]]] = {}

    async def grant(self, envelope: Envelope, command: DataGrant) -> None:
        """Handle `data.grant`: record the grant, announce `data.granted` (or `data.failed`)."""
        tenant = envelope.tenant
        if tenant is None:
            raise Rejected("data.grant without a tenant")
        staging = await self.store.get_staging(command.job_id)
        if staging is not None and staging["tenant"] != tenant:
            raise Rejected(f"job {command.job_id} was staged for another tenant")
        if staging is not None and staging["state"] != "staged":
            await self.bus.emit(
                "data.failed",
                DataFailed(
                    job_id=command.job_id, reason=f"inputs are {staging['state']}, not staged"
                ),
                **envelope.caused(),
            )
            return
        objects = staging["objects"] if staging else []
        # A new attempt supersedes the old: a node that lost the job reads no more.
        await self.store.revoke_grants(command.job_id, below_attempt=command.attempt)
        self._forget(command.job_id)
        await self.store.put_grant(
            {
                "_id": f"{command.job_id}:{command.attempt}",
                "job_id": command.job_id,
                "attempt": command.attempt,
                "node_id": command.node_id,
                "tenant": tenant,
                "objects": objects,
                "manifest": staging["manifest"] if staging else [],
                "expires_at": command.expires_at,
                "upload_until": command.upload_until,
                "revoked_at": None,
                "created_at": utcnow(),
            }
        )
        log.info(
            "grant_issued",
            job_id=command.job_id,
            node_id=command.node_id,
            objects=len(objects),
            expires_at=command.expires_at.isoformat(),
        )
        await self.bus.emit(
            "data.granted",
            DataGranted(
                job_id=command.job_id,
                attempt=command.attempt,
                node_id=command.node_id,
                objects=len(objects),
                expires_at=command.expires_at,
            ),
            **envelope.caused(),
        )

    async def release(self, envelope: Envelope, command: DataRelease) -> int:
        """Handle `data.release`: revoke the job's grants and unpin its inputs."""
        revoked = await self.store.revoke_grants(command.job_id)
        self._forget(command.job_id)
        await self.store.release_staging(command.job_id)
        await self.bus.emit(
            "data.released",
            DataReleased(job_id=command.job_id, grants_revoked=revoked),
            **envelope.caused(),
        )
        return revoked

    async def check(
        self,
        principal: Principal,
        job_id: str,
        deadline_field: Deadline,
        sha256: str | None = None,
    ) -> Access:
        """Allow a node's access to a job's data (one object, or the job as a whole)."""
        if principal.role != Role.node:
            raise Denied(403, "only node agents read job data through grants")
        now = utcnow()
        grant = await self._live_grant(job_id, principal.name, now, deadline_field)
        if grant is None:
            raise Denied(403, await self._why_not(job_id, principal.name, now, deadline_field))
        if principal.grant is not None and principal.grant != grant["_id"]:
            raise Denied(403, f"this delegated token reaches grant {principal.grant} only")
        if sha256 is not None:
            if sha256 not in grant["objects"]:
                raise Denied(403, f"object {sha256} is not part of job {job_id}'s grant")
            obj = await self._object(grant, sha256)
            if obj is None or grant["tenant"] not in obj["tenants"]:
                raise Denied(403, f"object {sha256} is not held for tenant {grant['tenant']}")
            if obj["quarantined"]:
                raise Denied(410, f"object {sha256} failed its integrity check and is quarantined")
            return Access(grant=grant, node_id=principal.name, object=obj)
        return Access(grant=grant, node_id=principal.name)

    async def delegate(self, principal: Principal, job_id: str) -> tuple[str, GrantDoc]:
        """A new token standing for the node on its live grant of `job_id`; the grant."""
        if principal.grant is not None:
            raise Denied(403, "a delegated token cannot delegate")
        access = await self.check(principal, job_id, "upload_until")
        token = DELEGATED_PREFIX + secrets.token_urlsafe(32)
        await self.store.add_delegate(access.grant["_id"], token_digest(token))
        log.info("grant_delegated", job_id=job_id, grant=access.grant["_id"])
        return token, access.grant

    async def delegated_principal(self, digest: str) -> Principal | None:
        """Who a delegated token stands for (the `TokenStore`'s lookup for them)."""
        grant = await self.store.delegated_grant(digest)
        if grant is None:
            return None
        return Principal(
            name=grant["node_id"], tenant=grant["tenant"], role=Role.node, grant=grant["_id"]
        )

    async def _live_grant(
        self, job_id: str, node_id: str, now: datetime, field: Deadline
    ) -> GrantDoc | None:
        key = (job_id, node_id, field)
        recent = self._recent.get(key)
        if recent is not None and recent[0] > time.monotonic() and recent[1][field] > now:
            return recent[1]
        grant = await self.store.live_grant(job_id, node_id, now, field)
        if grant is not None:
            if len(self._recent) > 10_000:
                self._recent.clear()
            self._recent[key] = (time.monotonic() + GRANT_REUSE_S, grant)
        return grant

    async def _object(self, grant: GrantDoc, sha256: str) -> ObjectDoc | None:
        """The catalog's record of an object of `grant`, reused for `GRANT_REUSE_S`."""
        now = time.monotonic()
        recent = self._objects.get(grant["_id"])
        if recent is None or recent[0] <= now:
            if len(self._objects) > 10_000:
                self._objects.clear()
            recent = self._objects[grant["_id"]] = (now + GRANT_REUSE_S, {})
        known = recent[1]
        if sha256 not in known:
            at = grant["objects"].index(sha256)
            wanted = [
                sha for sha in grant["objects"][at : at + OBJECTS_AT_ONCE] if sha not in known
            ]
            known.update((obj["_id"], obj) for obj in await self.store.get_objects(wanted))
        return known.get(sha256)

    def _forget(self, job_id: str) -> None:
        """After the job's grants changed in the store: none of them is reused."""
        for key in [key for key in self._recent if key[0] == job_id]:
            del self._recent[key]
        for grant_id in [
            grant_id for grant_id in self._objects if grant_id.startswith(f"{job_id}:")
        ]:
            del self._objects[grant_id]

    def forget_objects(self) -> None:
        """After an object changed in the store (quarantined): no record of one is reused."""
        self._objects.clear()

    async def _why_not(self, job_id: str, node_id: str, now: datetime, field: Deadline) -> str:
        grant = await self.store.any_grant(job_id)
        if grant is None:
            return f"no grant for job {job_id}"
        if grant["node_id"] != node_id:
            return f"job {job_id}'s grant is for node {grant['node_id']}, not {node_id}"
        if grant["revoked_at"] is not None:
            return f"job {job_id}'s grant was revoked when the job ended"
        return f"job {job_id}'s grant expired at {grant[field].isoformat()}"
